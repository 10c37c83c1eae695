//! Rendering `x-ratelimit-*` headers and OpenAI durations.
