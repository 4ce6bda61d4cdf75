# Shared by the side-by-side benchmarks (rm.sh, ppo.sh, dpo.sh, grpo.sh), sourced after OUT and
# WAIT_FOR are set: waiting for an idle machine, timing a run with /usr/bin/time -v while
# measuring the CPU share other processes took, and reading peak RSS.

# CPU busy percentage over 3 seconds (all cores, from /proc/stat).
cpu_busy() {
  local a b
  a=($(head -n1 /proc/stat)); sleep 3; b=($(head -n1 /proc/stat))
  local idle=$(( b[4] + b[5] - a[4] - a[5] )) total=0 i
  for i in 1 2 3 4 5 6 7 8; do total=$(( total + b[i] - a[i] )); done
  echo $(( 100 - 100 * idle / (total > 0 ? total : 1) ))
}
wait_idle() {
  [ -n "$WAIT_FOR" ] || return 0
  local i
  for i in $(seq 45); do
    if ! pgrep -f "$WAIT_FOR" > /dev/null && [ "$(cpu_busy)" -lt 15 ]; then return 0; fi
    [ "$i" = 1 ] && echo "  waiting: $(pgrep -fa "$WAIT_FOR" | head -n 3 | cut -c1-80 | tr '\n' ';') cpu busy $(cpu_busy) %" >&2
    sleep 20
  done
  echo "  warning: still busy after 15 min, measuring anyway" >&2
}
# Busy CPU jiffies of the whole machine (user nice system irq softirq steal), to tell afterwards
# how much of the CPUs other processes took during a timed run.
busy_jiffies() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9 }' /proc/stat; }
# timed NAME command...: /usr/bin/time -v into $OUT/NAME.time, and $OUT/NAME.others: the share
# of all CPUs (0..1) used by other processes while it ran.
timed() {
  local name=$1; shift
  local b0 t0 rc=0
  b0=$(busy_jiffies); t0=$(date +%s.%N)
  /usr/bin/time -v -o "$OUT/$name.time" "$@" || rc=$?
  awk -v b0="$b0" -v b1="$(busy_jiffies)" -v t0="$t0" -v t1="$(date +%s.%N)" -v hz="$(getconf CLK_TCK)" \
      -v n="$(nproc)" -F': ' '/User time/ { u = $2 } /System time/ { s = $2 }
      END { o = (b1 - b0) / hz - u - s; if (o < 0) o = 0; printf "%.3f\n", o / ((t1 - t0) * n) }' \
      "$OUT/$name.time" > "$OUT/$name.others"
  return $rc
}
rss_mb() { awk -F': ' '/Maximum resident set size/ { printf "%.0f", $2 / 1024 }' "$1"; }

# Run a command that times itself with `timed NAME ...` after waiting for an idle machine; with
# WAIT_FOR set, a run during which other processes took over 5 % of the CPUs (NAME.others) is
# repeated (twice at most).
measure_quiet() { # NAME command...
  local name=$1 attempt; shift
  for attempt in 1 2 3; do
    wait_idle
    "$@"
    [ -n "$WAIT_FOR" ] && awk '{ exit !($1 > 0.05) }' "$OUT/$name.others" || break
    echo "    (others were busy: measuring again)" >&2
  done
}
