//! The one mapping from errors to HTTP responses (OpenAI error shape).
