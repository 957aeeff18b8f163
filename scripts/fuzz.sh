#!/usr/bin/env bash
# Runs the cargo-fuzz targets of fuzz/ (every decoder of outside input),
# each for a bounded time, on the stable toolchain (RUSTC_BOOTSTRAP=1).
# Installs cargo-fuzz into .tools/cargo-fuzz when missing.
#
#   scripts/fuzz.sh                    # every target, 15 s each (the test command's run)
#   FUZZ_SECONDS=600 FUZZ_KEEP=1 scripts/fuzz.sh token envelope   # longer, keep new inputs
#
# FUZZ_SECONDS: run time per target (default 15).
# FUZZ_KEEP=1: inputs that add coverage are merged into fuzz/corpus/TARGET
#   (commit them); otherwise the run works on a copy and the repo is untouched.
# FUZZ_JOBS: parallel libFuzzer processes per target (default 1).
# FUZZ_SANITIZER: none (default: the gateway forbids unsafe code, so the
#   run looks for panics, failed assertions, hangs and memory blow-ups, and
#   builds and runs faster) or address (AddressSanitizer over the
#   dependencies' unsafe code too; a second build).
# A crash, leak, timeout or out-of-memory fails the script and leaves the
# input in fuzz/artifacts/TARGET/ (reproduce: RUSTC_BOOTSTRAP=1 cargo fuzz run -O -a -s none TARGET FILE).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root/fuzz"
seconds=${FUZZ_SECONDS:-15}
jobs=${FUZZ_JOBS:-1}
all=(ws_reader json_command proto_command publish_data room_name token envelope)
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${all[@]}")

tools="$root/.tools/cargo-fuzz"
if ! [ -x "$tools/bin/cargo-fuzz" ]; then
  echo "installing cargo-fuzz 0.13.2 into $tools (about 2 minutes)" >&2
  cargo install --quiet --locked cargo-fuzz@0.13.2 --root "$tools" >&2
fi
export PATH="$tools/bin:$PATH" RUSTC_BOOTSTRAP=1

max_len() {
  case $1 in
    ws_reader) echo 9000 ;;   # frames over the reader's 4 KiB limit too
    token) echo 2048 ;;
    *) echo 4096 ;;
  esac
}

sanitizer=${FUZZ_SANITIZER:-none}
flags=(-O -a -s "$sanitizer")
# One release build with debug assertions (overflow checks) for every target.
echo "fuzz: building the targets (release, debug assertions, sanitizer $sanitizer)" >&2
if ! cargo fuzz build "${flags[@]}" >"$root/fuzz/build.log" 2>&1; then
  tail -40 "$root/fuzz/build.log" >&2
  exit 1
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failed=()
for t in "${targets[@]}"; do
  mkdir -p "$work/$t" "artifacts/$t"
  log="$work/$t.log"
  echo "fuzz $t: ${seconds}s" >&2
  # New inputs go to the scratch dir (first corpus dir); the kept corpus is read.
  if ! cargo fuzz run "${flags[@]}" "$t" "$work/$t" "corpus/$t" -- \
      -max_total_time="$seconds" -max_len="$(max_len "$t")" -timeout=10 -rss_limit_mb=2048 \
      -jobs="$jobs" -workers="$jobs" -print_final_stats=1 >"$log" 2>&1; then
    tail -40 "$log" >&2
    failed+=("$t")
    continue
  fi
  runs=$(grep -h 'stat::number_of_executed_units' "$log" fuzz-*.log 2>/dev/null | awk '{s+=$2} END {print s+0}')
  cov=$(grep -ho 'cov: [0-9]*' "$log" | tail -1)
  echo "fuzz $t: ok, $runs inputs, $cov, corpus $(ls "corpus/$t" | wc -l) kept + $(ls "$work/$t" | wc -l) new" >&2
  rm -f fuzz-*.log
  if [ "${FUZZ_KEEP:-0}" = 1 ]; then
    cargo fuzz run "${flags[@]}" "$t" "corpus/$t" "$work/$t" -- -merge=1 -max_len="$(max_len "$t")" >"$log" 2>&1 \
      || { tail -20 "$log" >&2; failed+=("$t (merge)"); }
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: FAILED: ${failed[*]} (inputs in $root/fuzz/artifacts/)" >&2
  exit 1
fi
echo "fuzz: ${#targets[@]} targets passed, ${seconds}s each" >&2
