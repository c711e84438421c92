#!/usr/bin/env bash
# Runs the end-to-end outbox comparison (bench/compare.cpp) over designs and producer counts and
# writes a markdown table and a gnuplot chart of throughput and commit-to-publish p99.
#   bash bench/compare.sh                 # 50,000 commits per run (20,000 paced), P = 1, 8, 32
#   bash bench/compare.sh --small         # 4,000 commits per run (what CI runs)
#   bash bench/compare.sh --bin build/bench/pop_compare --out DIR --no-plot
# Each run checks that every committed event was published at least once, in order per key, and
# nothing uncommitted was: a failed check fails the script. Files are written in the working
# directory (journals, removed after each run; a disk, not a tmpfs, for durable figures).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
commits=50000
paced_commits=20000
bin=""
out="$here/build/compare"
plot=1
while [ $# -gt 0 ]; do
  case "$1" in
    --small) commits=4000; paced_commits=2000 ;;
    --bin) bin="$2"; shift ;;
    --out) out="$2"; shift ;;
    --no-plot) plot=0 ;;
    *) echo "usage: compare.sh [--small] [--bin PATH] [--out DIR] [--no-plot]" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$bin" ]; then
  if [ "$plot" = 1 ]; then bash "$here/.ci/install-deps.sh" gnuplot-nox; else bash "$here/.ci/install-deps.sh"; fi
  cmake -S "$here" -B "$here/build" -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
  cmake --build "$here/build" --target pop_compare >/dev/null
  bin="$here/build/bench/pop_compare"
fi
mkdir -p "$out"
results="$out/results.jsonl"
: > "$results"
designs=(mutex sqlite pop-memory pop-process pop-power)
cd "$out"
for design in "${designs[@]}"; do
  for p in 1 8 32; do
    # Throughput: as fast as the producers go.
    "$bin" --design "$design" --producers "$p" --commits "$commits" | sed 's/^{/{"mode":"max",/' >> "$results"
    # Latency without a backlog: 10,000 commits/s in all.
    "$bin" --design "$design" --producers "$p" --commits "$paced_commits" --rate 10000 | sed 's/^{/{"mode":"paced",/' >> "$results"
  done
done
python3 - "$results" "$out/compare.md" "$out/compare.dat" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
by = {}
for r in rows:
    by.setdefault((r["design"], r["producers"]), {})[r["mode"]] = r
designs = []
for r in rows:
    if r["design"] not in designs: designs.append(r["design"])
with open(sys.argv[2], "w") as md:
    md.write("| design | P | published/s | p50 / p99 µs (max rate) | p50 / p99 µs (paced 10k/s) |\n")
    md.write("|---|---|---|---|---|\n")
    for d in designs:
        for p in (1, 8, 32):
            m, q = by[(d, p)]["max"], by[(d, p)]["paced"]
            md.write(f"| {d} | {p} | {m['published_per_s']:,.0f} | {m['p50_us']} / {m['p99_us']} | {q['p50_us']} / {q['p99_us']} |\n")
with open(sys.argv[3], "w") as dat:
    dat.write("design " + " ".join(f"P{p}_rate P{p}_p99" for p in (1, 8, 32)) + "\n")
    for d in designs:
        dat.write(d + " " + " ".join(f"{by[(d,p)]['max']['published_per_s']:.0f} {max(by[(d,p)]['paced']['p99_us'],1)}" for p in (1, 8, 32)) + "\n")
PY
cat "$out/compare.md"
if [ "$plot" = 1 ] && command -v gnuplot >/dev/null; then
  gnuplot <<GP
set terminal pngcairo size 1100,450
set output "$out/compare.png"
set multiplot layout 1,2
set style data histogram
set style histogram cluster gap 1
set style fill solid 0.8
set logscale y
set key top right
set xtics rotate by -20
set title "events published per second (max rate)"
plot "$out/compare.dat" using 2:xtic(1) title "P=1", '' using 4 title "P=8", '' using 6 title "P=32"
set title "commit-to-publish p99, µs (paced 10,000 commits/s)"
plot "$out/compare.dat" using 3:xtic(1) title "P=1", '' using 5 title "P=8", '' using 7 title "P=32"
unset multiplot
GP
  echo "chart: $out/compare.png"
fi
