"""The official openai SDK against a running plangate: non-streaming,
streaming, the RateLimitError paths (retry-after honoured; no retry
where x-should-retry says false), x-request-id on errors, and
models.list() / models.retrieve() (the caller's plan's models).

Env: PLANGATE_BASE_URL (http://host:port/v1), PLANGATE_KEY, PLANGATE_POOR_KEY
(an account with no credits). Prints one line per check; exits non-zero on
the first failure.
"""
import os
import sys
import time

import openai
from openai import OpenAI

base = os.environ["PLANGATE_BASE_URL"]
key = os.environ["PLANGATE_KEY"]
poor = os.environ["PLANGATE_POOR_KEY"]
msgs = [{"role": "user", "content": "hello"}]


def check(cond, what):
    if not cond:
        print(f"FAIL: {what}", flush=True)
        sys.exit(1)
    print(f"ok: {what}", flush=True)


client = OpenAI(base_url=base, api_key=key, max_retries=0)

r = client.chat.completions.create(model="gpt-sdk", messages=msgs)
check(r.usage is not None and r.usage.total_tokens > 0, "non-streaming completion with usage")

# The 1 request/s window is now full: without retries the SDK raises.
try:
    client.chat.completions.create(model="gpt-sdk", messages=msgs)
    check(False, "second request in the same second is refused")
except openai.RateLimitError as e:
    check(e.code == "rate_limit_exceeded", f"RateLimitError code rate_limit_exceeded ({e.code})")
    ra = e.response.headers.get("retry-after")
    ram = e.response.headers.get("retry-after-ms")
    check(ra is not None and ram is not None and 0 < int(ram) <= 1000, f"retry-after {ra}, retry-after-ms {ram}")

# With retries the SDK sleeps retry-after-ms and succeeds once the window
# turns over.
retrying = OpenAI(base_url=base, api_key=key, max_retries=3)
start = time.monotonic()
r = retrying.chat.completions.create(model="gpt-sdk", messages=msgs)
took = time.monotonic() - start
check(r.choices is not None, f"retried after 429 and succeeded in {took:.2f}s")

# Streaming: content arrives in chunks; the gateway's own usage chunk is
# not shown unless asked for.
time.sleep(1.05)  # the SDK check above used this second's request
chunks = list(retrying.chat.completions.create(model="gpt-sdk", messages=msgs, stream=True))
text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
check(len(chunks) > 1 and text, f"streamed {len(chunks)} chunks")
check(all(c.usage is None for c in chunks), "no usage chunk unless requested")

time.sleep(1.05)
chunks = list(
    retrying.chat.completions.create(
        model="gpt-sdk", messages=msgs, stream=True, stream_options={"include_usage": True}
    )
)
check(any(c.usage is not None and c.usage.total_tokens > 0 for c in chunks), "usage chunk when requested")

# No retry where the gateway says it is pointless.
start = time.monotonic()
try:
    OpenAI(base_url=base, api_key=poor, max_retries=3).chat.completions.create(model="gpt-paid", messages=msgs)
    check(False, "account without credits is refused")
except openai.RateLimitError as e:
    took = time.monotonic() - start
    check(e.code == "insufficient_quota", f"insufficient_quota ({e.code})")
    check(took < 0.5, f"x-should-retry: false honoured (no retry, {took:.2f}s)")

try:
    OpenAI(base_url=base, api_key="pg_not_a_key", max_retries=0).chat.completions.create(
        model="gpt-sdk", messages=msgs
    )
    check(False, "bad key refused")
except openai.AuthenticationError as e:
    check(e.code == "invalid_api_key", f"AuthenticationError {e.code}")
    check((e.request_id or "").startswith("req_"), f"a 401 carries x-request-id ({e.request_id})")

# The models the caller's plan allows, as the SDK (and UIs built on it)
# lists them: GET /v1/models and /v1/models/{id}, answered by the gateway.
ids = [m.id for m in client.models.list()]
check(ids == ["gpt-paid", "gpt-sdk"], f"models.list() is the plan's models ({ids})")
m = client.models.retrieve("gpt-sdk")
check(m.id == "gpt-sdk" and m.owned_by == "plangate", f"models.retrieve() ({m.id})")
try:
    client.models.retrieve("gpt-elsewhere")
    check(False, "a model the plan lacks is not found")
except openai.NotFoundError as e:
    check(e.code == "model_not_found", f"NotFoundError {e.code}")
print("all ok")
