#!/bin/bash
# Alternating A/B on one machine: old = 5dc3028 (/tmp/ab-old, a git worktree), new = HEAD (/work/main).
cd /work/main
export GLIBC_TUNABLES=glibc.malloc.hugetlb=1
run() { # tag dir
  local tag=$1 dir=$2
  echo "=== $tag $(date -u +%H:%M:%S) ===" >> runs/ab-head/pairs.log
  (cd $dir && PYTHONPATH=$dir /work/main/.venv/bin/python scripts/benchmark.py --presets seed --merges auto --processes 3 --json /work/main/runs/ab-head/$tag.json) > runs/ab-head/$tag.txt 2>&1
  cat runs/ab-head/$tag.txt >> runs/ab-head/pairs.log
}
run seed-old-1 /tmp/ab-old
run seed-new-1 /work/main
run seed-old-2 /tmp/ab-old
run seed-new-2 /work/main
echo "=== done $(date -u +%H:%M:%S) ===" >> runs/ab-head/pairs.log
