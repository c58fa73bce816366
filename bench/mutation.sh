#!/usr/bin/env bash
# Mutation testing of the planner's decisions: the README's command, run from a clean mutants/ folder, with
# its summary written to bench/results/mutation.txt.
#
#     bench/mutation.sh          (about 4 minutes on 2 cores)
#
# What is mutated and which tests run against each mutant: [tool.mutmut] in pyproject.toml. mutation.txt
# holds the command, the machine, the seconds it took, mutmut's final count line and its CI/CD stats
# (killed, survived, ...), and every mutant not killed with its diff, so that each can be checked to be
# equivalent. The run's own output, progress line included, is shown as it goes.
set -euo pipefail
cd "$(dirname "$0")/.."
MUTMUT=${MUTMUT:-.venv/bin/mutmut}  # MUTMUT=... runs another (e.g. a stand-in, to try this script)
OUT=bench/results/mutation.txt
LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT

# mutmut keeps an earlier run's results and only runs the mutants it has none for: start from nothing.
rm -rf mutants
start=$(date +%s)
if ! "$MUTMUT" run --max-children 2 2>&1 | tee "$LOG"; then
    echo "mutation.sh: mutmut run failed (output above); $OUT left as it was" >&2
    exit 1
fi
seconds=$(( $(date +%s) - start ))
"$MUTMUT" export-cicd-stats >/dev/null  # mutants/mutmut-cicd-stats.json
not_killed=$("$MUTMUT" results)

{
    echo "\$ $MUTMUT run --max-children 2 && $MUTMUT results    (bench/mutation.sh, from an empty mutants/)"
    echo "$(date -u +%Y-%m-%dT%H:%MZ); $(nproc) CPUs, load average at the end $(cut -d' ' -f1-3 /proc/loadavg);" \
         "$("$MUTMUT" --version); ${seconds} s"
    echo
    echo "final count: done/total, killed, no tests, timeout, suspicious, survived, skipped, caught by type check"
    tr '\r' '\n' <"$LOG" | grep '🎉' | tail -n 1 | sed 's/^[^ ]* //; s/ *$//'  # less the spinner
    echo
    echo "mutants/mutmut-cicd-stats.json:"
    cat mutants/mutmut-cicd-stats.json
    echo
    echo
    echo "not killed (mutmut results), each with its diff (mutmut show):"
    echo "$not_killed"
    for name in $(echo "$not_killed" | sed -n 's/^ *\([^ :]*\): .*/\1/p'); do
        echo
        "$MUTMUT" show "$name"
    done
} >"$OUT"
echo "summary written to $OUT"
