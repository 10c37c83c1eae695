-- wrk script for tests/load/bench.sh: POST an OpenAI chat completion with
-- a bearer key.
--
-- Environment (read once per wrk thread):
--   KEY        the API key (single-key mode, the default)
--   KEYS_FILE  a file with one key per line: every request uses the next key
--              (each thread starts at its own offset), e.g. 100,000 keys
--   MODEL      the model (= plangate endpoint id), default "gpt-bench"
--   STREAM     "1": ask for a streamed answer (with include_usage)
--   DELAY_MS   pause each connection this long between requests (fixed-rate
--              runs: rate ~ connections * 1000 / DELAY_MS)
--
-- done() prints one machine-readable line:
--   RESULT <requests/s> <p50 us> <p99 us> <requests> <non-2xx> <socket errors>

local model = os.getenv("MODEL") or "gpt-bench"
local stream = os.getenv("STREAM") == "1"
local delay_ms = tonumber(os.getenv("DELAY_MS") or "0")

local body
if stream then
  body = '{"model":"' .. model .. '","stream":true,"stream_options":{"include_usage":true},'
    .. '"messages":[{"role":"user","content":"Say hello in one short sentence."}]}'
else
  body = '{"model":"' .. model .. '",'
    .. '"messages":[{"role":"user","content":"Say hello in one short sentence."}]}'
end

wrk.method = "POST"
wrk.body = body
wrk.headers["Content-Type"] = "application/json"

local threads = {}
local next_id = 0

function setup(thread)
  thread:set("thread_id", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end

local keys = nil
local keys_file = os.getenv("KEYS_FILE")
if keys_file and keys_file ~= "" then
  keys = {}
  for line in io.lines(keys_file) do
    if #line > 0 then
      keys[#keys + 1] = line
    end
  end
else
  wrk.headers["Authorization"] = "Bearer " .. (os.getenv("KEY") or "none")
end

local i = 0

function init(args)
  if keys then
    -- Start each thread (and each run) at its own random place in the key
    -- list, so threads do not walk in step and successive runs cover
    -- different keys.
    math.randomseed(os.time() * 1000 + (thread_id or 0) * 7919)
    i = math.random(#keys) - 1
  end
end

if keys then
  function request()
    i = i + 1
    if i > #keys then
      i = 1
    end
    wrk.headers["Authorization"] = "Bearer " .. keys[i]
    return wrk.format(nil, nil, nil, nil)
  end
end

if delay_ms > 0 then
  function delay()
    return delay_ms
  end
end

function done(summary, latency, requests)
  local secs = summary.duration / 1e6
  local non2xx = summary.errors.status
  local sock = summary.errors.connect + summary.errors.read + summary.errors.write
    + summary.errors.timeout
  io.write(string.format("RESULT %.1f %d %d %d %d %d\n",
    summary.requests / secs,
    latency:percentile(50), latency:percentile(99),
    summary.requests, non2xx, sock))
end
