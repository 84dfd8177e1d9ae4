"""Summary of `strace -f -y -T -tt -e trace=fdatasync,fsync` output of squalld's job store
(bench/email_strace.sh): syncs of the -wal file and of the database, on the store thread (the
thread that syncs the -wal file most) and on the others, and per commit on the store thread
(a WAL sync, plus a checkpoint's WAL and database syncs when the commit ran one)."""
import re, sys, statistics
from collections import defaultdict
pat = re.compile(r'^(\d+)\s+(\S+)\s+(fdatasync|fsync)\(\d+<([^>]*)>\)\s+=\s+(-?\d+).*<([\d.]+)>')
calls = []
pending = {}
unfinished = re.compile(r'^(\d+)\s+\S+\s+(?:fdatasync|fsync)\(\d+<([^>]*)>\s+<unfinished')
resumed = re.compile(r'^(\d+)\s+\S+\s+<\.\.\. (?:fdatasync|fsync) resumed>.*<([\d.]+)>')
for line in open(sys.argv[1]):
    m = pat.match(line)
    if m:
        tid, ts, call, path, rc, dur = m.groups()
        calls.append((int(tid), path, float(dur) * 1000))
        continue
    m = unfinished.match(line)
    if m:
        pending[int(m.group(1))] = m.group(2)
        continue
    m = resumed.match(line)
    if m and int(m.group(1)) in pending:
        calls.append((int(m.group(1)), pending.pop(int(m.group(1))), float(m.group(2)) * 1000))
wal_tids = defaultdict(int)
for tid, path, d in calls:
    if path.endswith('-wal'): wal_tids[tid] += 1
store_tid = max(wal_tids, key=wal_tids.get)
def q(xs, p):
    xs = sorted(xs); return xs[min(len(xs) - 1, int(p * len(xs)))] if xs else 0
for who, sel in (("store thread", lambda t: t == store_tid), ("other threads", lambda t: t != store_tid)):
    for kind, ps in (("WAL", lambda p: p.endswith('-wal')), ("database", lambda p: p.endswith('.db'))):
        ds = [d for t, p, d in calls if sel(t) and ps(p)]
        if not ds: print(f"{who} {kind}: none"); continue
        print(f"{who} {kind}: {len(ds)} syncs, median {statistics.median(ds):.2f} ms, p90 {q(ds,.9):.2f}, max {max(ds):.2f}, >20ms {sum(d>20 for d in ds)}")
# commits: on the store thread, a WAL sync, plus any database sync right after it (a checkpoint in the commit)
commits = []
mine = [(p, d) for t, p, d in calls if t == store_tid]
i = 0
while i < len(mine):
    p, d = mine[i]
    if p.endswith('-wal') and i + 1 < len(mine) and mine[i + 1][0].endswith('.db') and commits:
        commits[-1] += d + mine[i + 1][1]  # a checkpoint in that commit: WAL sync, database sync
        i += 2
        continue
    if p.endswith('-wal'): commits.append(d)
    elif commits: commits[-1] += d
    i += 1
print(f"store thread syncs per commit (WAL + any checkpoint's): {len(commits)} commits, median {statistics.median(commits):.2f} ms, p90 {q(commits,.9):.2f}, p99 {q(commits,.99):.2f}, > 20 ms: {sum(c>20 for c in commits)} ({100*sum(c>20 for c in commits)/len(commits):.1f}%)")
