#!/bin/bash
# Before/after on one machine, alternating: old = 5b29874 (/tmp/old), new = working tree.
cd /work/main
run() { # tag dir presets processes
  local tag=$1 dir=$2 presets=$3 procs=$4
  echo "=== $tag $(date -u +%H:%M:%S) ===" >> runs/pairs.log
  (cd $dir && PYTHONPATH=$dir /work/main/.venv/bin/python scripts/benchmark.py --presets $presets --merges auto --processes $procs --json /work/main/runs/$tag.json) > runs/$tag.txt 2>&1
  cat runs/$tag.txt >> runs/pairs.log
}
run seed-old-1 /tmp/old seed 3
run seed-new-1 /work/main seed 3
run seed-old-2 /tmp/old seed 3
run seed-new-2 /work/main seed 3
run fast-new-1 /work/main fast 2
run fast-old-1 /tmp/old fast 2
echo "=== done $(date -u +%H:%M:%S) ===" >> runs/pairs.log
