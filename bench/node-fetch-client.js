// Node's built-in fetch (undici) as a load generator for bench/run_client.sh: CONCURRENCY loops,
// each awaiting one fetch after another, for WARMUP then SECONDS. Prints one JSON line like
// examples/fetch_bench: fetches, errors, seconds, fetches_per_s, cpu_us_per_fetch (this
// process's user + system CPU over the measured window).
'use strict';

const [url, concurrency = '100', seconds = '10', warmup = '1'] = process.argv.slice(2);
if (!url) {
  console.error('usage: node node-fetch-client.js URL [CONCURRENCY] [SECONDS] [WARMUP]');
  process.exit(64);
}

async function main() {
  const warmEnd = performance.now() + Number(warmup) * 1000;
  const stopAt = warmEnd + Number(seconds) * 1000;
  let measuring = false;
  let fetches = 0;
  let errors = 0;
  let nonOk = 0;
  let startTime = 0;
  let startCpu = null;
  let firstError = null;

  async function loop() {
    for (;;) {
      const now = performance.now();
      if (!measuring && now >= warmEnd) {
        measuring = true;
        startTime = now;
        startCpu = process.cpuUsage();
      }
      if (now >= stopAt) return;
      try {
        const response = await fetch(url);
        await response.text();
        if (measuring) {
          fetches++;
          if (!response.ok) nonOk++;
        }
      } catch (error) {
        if (measuring) errors++;
        if (!firstError) firstError = error;
      }
    }
  }

  await Promise.all(Array.from({ length: Number(concurrency) }, loop));
  const elapsed = (performance.now() - startTime) / 1000;
  const cpu = process.cpuUsage(startCpu);
  const cpuSeconds = (cpu.user + cpu.system) / 1e6;
  console.log(JSON.stringify({
    fetches, errors, non_2xx: nonOk, seconds: Number(elapsed.toFixed(3)),
    fetches_per_s: Math.round(fetches / elapsed),
    cpu_us_per_fetch: Number((cpuSeconds * 1e6 / Math.max(fetches, 1)).toFixed(2)),
    concurrency: Number(concurrency),
  }));
  if (firstError) console.error(`first error: ${firstError}`);
}

main();
