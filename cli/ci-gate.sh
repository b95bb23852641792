#!/usr/bin/env bash
# CI gate: fail the pipeline unless a prunecp certificate holds on held-out test data.
#
# Usage: cli/ci-gate.sh MODEL CERT TEST_DATA [VERDICT_JSON] [-- EXTRA_CERTIFY_ARGS...]
#
#   MODEL          the certified model file (pruned.safetensors)
#   CERT           its certificate (certificate.json from `prunecp calibrate`)
#   TEST_DATA      held-out test split, disjoint from calibration and from everything the model saw
#   VERDICT_JSON   where to save the verdict (default: certify-verdict.json); it is also printed
#   EXTRA ARGS     passed to `prunecp certify`, e.g. -- --significance 0.001 --device cpu
#
# Exit status is prunecp's: 0 the certificate holds, 4 it does not (hash mismatch or coverage test
# failed), 3 bad input (unreadable certificate, test data reused, ...), 2 usage error, 1 a bug.
# Set PRUNECP to run another command, e.g. PRUNECP="python -m prunecp_cli".
#
# Example (GitHub Actions step):
#   - run: cli/ci-gate.sh pruned.safetensors certificate.json test.npz verdict.json
set -euo pipefail

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
}

if [[ $# -lt 3 || "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    usage
    [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]] && exit 0
    exit 2
fi

model=$1 cert=$2 data=$3
shift 3
verdict="certify-verdict.json"
if [[ $# -gt 0 && "$1" != "--" ]]; then
    verdict=$1
    shift
fi
[[ $# -gt 0 && "$1" == "--" ]] && shift

read -r -a prunecp <<< "${PRUNECP:-prunecp}"

# certify prints exactly one JSON object on stdout; its exit status is the gate's.
status=0
"${prunecp[@]}" certify "$model" --cert "$cert" --data "$data" --json --quiet "$@" > "$verdict" || status=$?

if [[ -s "$verdict" ]]; then
    cat "$verdict"
else
    rm -f "$verdict"   # no verdict was produced (bad input or usage error): leave no empty file
fi
if [[ $status -eq 0 ]]; then
    echo "ci-gate: certificate holds ($cert for $model on $data)" >&2
else
    echo "ci-gate: certificate check failed with exit status $status" >&2
fi
exit "$status"
