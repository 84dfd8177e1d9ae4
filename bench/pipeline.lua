-- wrk script for bench/run.sh's pipelined scenario: every write carries DEPTH GET requests for the
-- URL given to wrk (DEPTH is the first argument after "--", 16 if none). wrk counts each response
-- as a request, but it records one latency sample per batch: the time from writing the batch to
-- reading its last response.

init = function(args)
  local depth = tonumber(args[1]) or 16
  local requests = {}
  for i = 1, depth do
    requests[i] = wrk.format()
  end
  batch = table.concat(requests)
end

request = function()
  return batch
end

-- done(): the JSON summary shared with the other scenarios, from the file beside this one.
local script_dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(script_dir .. "report.lua")
