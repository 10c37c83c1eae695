//! A mock OpenAI upstream (JSON with usage, SSE with the usage chunk, embeddings) for `plangate dev` and tests.
