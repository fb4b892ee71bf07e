-- wrk script: a small chat completion with a unique body per request (so loop detection never fires),
-- the agent token from $TOKEN, and streaming when $STREAM=1.
local counter = 0
local token = os.getenv("TOKEN") or ""
local stream = os.getenv("STREAM") == "1"

request = function()
  counter = counter + 1
  local body = '{"model":"gpt-4o-mini","max_tokens":64,' .. (stream and '"stream":true,' or '') ..
    '"messages":[{"role":"user","content":"Summarise invoice INV-' .. counter .. ' for the AP team"}]}'
  return wrk.format("POST", nil, {["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. token}, body)
end
