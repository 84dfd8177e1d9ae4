-- wrk script for bench/run_email.sh: every request is POST /email with one small JSON email, so
-- every 202 is a job committed to the store ([jobs] durability decides whether with an fsync)
-- before the answer left. The SMTP sends happen later, in the background, and are not measured.
-- done(): the WRK_JSON summary line of report.lua (errors.status counts answers >= 400, e.g. the
-- 503 of a full queue).

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"to": "Bench Recipient <rcpt@example.com>", "subject": "squall bench", ' ..
  '"text": "Hello from wrk.\\n", "html": "<p>Hello from <b>wrk</b>.</p>\\n"}'

local script_dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(script_dir .. "report.lua")
