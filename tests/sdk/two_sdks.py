"""The official openai and anthropic SDKs against one running plangate,
with the same plangate key: the openai SDK sends it as `Authorization:
Bearer`, the anthropic SDK as `x-api-key` (before 2.0) or `Authorization:
Bearer` (2.x); the messages route reads `auth_header = ["x-api-key",
"authorization"]`.

Env: PLANGATE_BASE (http://host:port), PLANGATE_KEY. Prints one line per
check; exits non-zero on the first failure.
"""
import os
import sys

import anthropic
import openai

base = os.environ["PLANGATE_BASE"]
key = os.environ["PLANGATE_KEY"]
msgs = [{"role": "user", "content": "hello"}]


def check(cond, what):
    if not cond:
        print(f"FAIL: {what}", flush=True)
        sys.exit(1)
    print(f"ok: {what}", flush=True)


oa = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
r = oa.chat.completions.create(model="chat-model", messages=msgs)
check(r.usage is not None and r.usage.total_tokens > 0, "openai SDK: chat completion")

# The SDK's own way: `x-api-key` before 2.0, `Authorization: Bearer` since.
an = anthropic.Anthropic(base_url=base, api_key=key, max_retries=0)
m = an.messages.create(model="claude-model", max_tokens=16, messages=msgs)
check(m.type == "message" and m.usage.output_tokens > 0, f"anthropic SDK {anthropic.__version__}: message")
# The key in `x-api-key` whatever the SDK's version does by itself.
legacy = anthropic.Anthropic(base_url=base, api_key=None, default_headers={"x-api-key": key}, max_retries=0)
m = legacy.messages.create(model="claude-model", max_tokens=16, messages=msgs)
check(m.type == "message", "anthropic SDK with the key in x-api-key: message")

try:
    anthropic.Anthropic(base_url=base, api_key="pg_not_a_key", max_retries=0).messages.create(
        model="claude-model", max_tokens=16, messages=msgs
    )
    check(False, "anthropic SDK: a bad key is refused")
except anthropic.AuthenticationError as e:
    check(e.status_code == 401, "anthropic SDK: AuthenticationError for a bad key")

ids = [x.id for x in oa.models.list()]
check("claude-model" in ids and "chat-model" in ids, f"openai SDK: models.list() ({ids})")
print("all ok")
