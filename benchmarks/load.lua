-- wrk script for every scenario: TokenReview POSTs or bearer GETs, fed from token files.
--
-- Arguments after "--" are key=value pairs:
--   mode=review|bearer   POST a TokenReview to path, or GET path with Authorization: Bearer
--   path=/authenticate   request path
--   tokens=FILE          one token per line; each wrk thread takes its own slice and
--                        cycles through it (a pool larger than the run = a new token per request)
--   threads=N            number of wrk threads (for the slicing)
--   next=FILE at=EPOCH   from unix time EPOCH on, send tokens from FILE instead (key rotation)
--   check=review|status  count answers that are not "authenticated": true / not HTTP 200
-- done() prints one line "WRKJSON {...}" with the summary, percentiles and counters.

local threads = {}
local counter = 0

function setup(thread)
   thread:set("tid", counter)
   counter = counter + 1
   table.insert(threads, thread)
end

local function read_slice(file, me, n)
   local all = {}
   for line in io.lines(file) do
      if #line > 0 then table.insert(all, line) end
   end
   if #all < n then return all end
   local mine = {}
   for i = 1, #all do
      if (i - 1) % n == me then table.insert(mine, all[i]) end
   end
   return mine
end

local mode, path, check, switch_at = "review", "/", nil, nil
local current, later = {}, nil
local idx = 0
local headers_review = { ["Content-Type"] = "application/json" }

function init(args)
   local opts = {}
   for _, a in ipairs(args) do
      local k, v = a:match("^([%w_]+)=(.*)$")
      if k then opts[k] = v end
   end
   mode = opts.mode or "review"
   path = opts.path or "/"
   check = opts.check
   local n = tonumber(opts.threads or "1")
   current = read_slice(opts.tokens, tid, n)
   if opts.next then
      later = read_slice(opts.next, tid, n)
      switch_at = tonumber(opts.at)
   end
   if check == nil then
      -- Without response() wrk does not collect bodies: no cost when nothing is checked.
      response = nil
   end
   failures = 0
   accepted = 0
   responses = 0
   sent_later = 0
end

function request()
   if later and os.time() >= switch_at then
      current, later, idx = later, nil, 0
   end
   idx = idx + 1
   if idx > #current then idx = 1 end
   local tok = current[idx]
   if later == nil and switch_at then sent_later = sent_later + 1 end
   if mode == "bearer" then
      return wrk.format("GET", path, { ["Authorization"] = "Bearer " .. tok }, nil)
   end
   local body = '{"apiVersion":"authentication.k8s.io/v1","kind":"TokenReview",'
      .. '"metadata":{"creationTimestamp":null},"spec":{"token":"' .. tok .. '"},'
      .. '"status":{"user":{}}}'
   return wrk.format("POST", path, headers_review, body)
end

function response(status, headers, body)
   if check == nil then return end
   responses = responses + 1
   if check == "status" then
      if status == 200 then accepted = accepted + 1 else failures = failures + 1 end
   elseif body and body:find('"authenticated":true', 1, true) then
      accepted = accepted + 1
   else
      failures = failures + 1
   end
end

function done(summary, latency, requests)
   local f, a, r, s = 0, 0, 0, 0
   for _, t in ipairs(threads) do
      f = f + (t:get("failures") or 0)
      a = a + (t:get("accepted") or 0)
      r = r + (t:get("responses") or 0)
      s = s + (t:get("sent_later") or 0)
   end
   local e = summary.errors
   local out = string.format(
      '{"duration_us":%d,"requests":%d,"bytes":%d,'
         .. '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},'
         .. '"latency_us":{"mean":%.1f,"stdev":%.1f,"max":%d,"p50":%d,"p90":%d,"p99":%d,"p999":%d},'
         .. '"checked":%d,"accepted":%d,"failures":%d,"sent_after_switch":%d}',
      summary.duration, summary.requests, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency.mean, latency.stdev, latency.max,
      latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency:percentile(99.9),
      r, a, f, s)
   io.write("WRKJSON " .. out .. "\n")
end
