# Starts and stops pcscd with cardbridge's vpcd reader (etc/reader.conf.d). pcscd 1.9.9
# always listens on /run/pcscd/pcscd.comm, so there is one per machine: a pcscd that is
# already running is stopped first, because it would not have our reader.
# Sourced by scripts/test, scripts/demo and the benchmarks.

PCSCD_LOG=${PCSCD_LOG:-/tmp/cardbridge-pcscd.log}
_pcscd_pid=""

pcscd_start() {
  local here; here=$(pwd)
  if pgrep -x pcscd >/dev/null; then
    pkill -x pcscd || true
    for _ in $(seq 50); do pgrep -x pcscd >/dev/null || break; sleep 0.1; done
  fi
  mkdir -p /run/pcscd
  pcscd -f -c "$here/etc/reader.conf.d" >"$PCSCD_LOG" 2>&1 &
  _pcscd_pid=$!
  for _ in $(seq 100); do
    [ -S /run/pcscd/pcscd.comm ] && ss -ltn 2>/dev/null | grep -q ':35963 ' && return 0
    sleep 0.1
  done
  echo "pcscd did not come up with the vpcd reader; its log ($PCSCD_LOG):" >&2
  cat "$PCSCD_LOG" >&2
  return 1
}

pcscd_stop() {
  if [ -n "$_pcscd_pid" ]; then
    kill "$_pcscd_pid" 2>/dev/null || true
    wait "$_pcscd_pid" 2>/dev/null || true
    _pcscd_pid=""
  fi
}
