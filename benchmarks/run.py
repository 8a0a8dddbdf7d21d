#!/usr/bin/env python3
"""Side-by-side benchmark of SMTP relays on one machine, all on loopback.

    smtp-source --> [relay under test] --> smtp-sink

Systems:  direct (no relay: the physical limit), postfix (store-and-forward,
          private instance), aiosmtpd (stock Proxy handler), haraka
          (queue/smtp_forward, inline; optional), relay (any command given as
          RELAY_CMD / --relay-cmd; benchmarks/run.sh runs smtprelay).
Workloads: i (2000 x 1 KB, 10 sessions), ii (200 x 1 MB, 5 sessions),
          iii (1 x 50 MB), iv (20 sessions one after another, 1 x 1 KB each,
          per-message latency p50/p95), ivp (20 parallel sessions x 1 x 1 KB),
          v (500 concurrent idle sessions: RSS, and does it still serve);
          on request: vi (i with a TLS downstream), vii-10 / vii-1 (TLS both
          sides, sessions of ~10 / 1 messages), viii (i against two relay
          processes on one port too), lmtp-dovecot (LMTP to a real Dovecot).

The relay row is checked against the performance targets (PASS/FAIL).
Exit status: 0 all ok; 1 a run failed (e.g. a message did not reach the
sink); 3 every run ok but a target was missed.

Every server is started here and stopped here by its PID; every load is
bounded in count and time. Python standard library only. See README.md.

The parts: common.py (paths, /proc, the process registry), systems.py (the
systems under test and the sinks), measure.py (sampling, py-spy),
workloads.py (the workloads and one measured run), report.py (tables,
summary, targets), tls.py (certificates, stunnel), pyspy.py (profiles).
"""

import argparse
import json
import os
import resource
import shutil
import signal
import sys
import time

from common import HERE, WORK_BASE, Registry, background_busy, cleanup_leftovers, log
from report import derive, fmt, order, print_tables, report, versions
from systems import DEFAULT_SYSTEMS, SYSTEMS, workload_systems
from tls import make_pki
from workloads import ALIASES, DEFAULT_WORKLOADS, WORKLOADS, one_run


def parse_args():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--systems', default=None,
                    help='comma list of direct,postfix,haraka,aiosmtpd,relay '
                         '(default: direct,postfix,aiosmtpd, plus relay when '
                         'RELAY_CMD is set; haraka only when asked for)')
    ap.add_argument('--workloads', default=','.join(DEFAULT_WORKLOADS),
                    help=f'comma list of {",".join(WORKLOADS)} '
                         '(vii = vii-10,vii-1)')
    ap.add_argument('--repeat', type=int, default=1,
                    help='runs of each system x workload (default 1)')
    ap.add_argument('--relay-cmd', default=os.environ.get('RELAY_CMD'),
                    help='shell command that starts the relay under test; '
                         'placeholders {listen_port} {sink_port} {listen_host} '
                         '{sink_host} {sink_proto} {work_dir} (env RELAY_CMD)')
    ap.add_argument('--relay-name', default=os.environ.get('RELAY_NAME', 'relay'),
                    help='label of the RELAY_CMD system in the table')
    ap.add_argument('--relay-cwd', default=os.environ.get('RELAY_CWD'),
                    help='directory RELAY_CMD runs in (default: the current '
                         'one; env RELAY_CWD)')
    ap.add_argument('--relay-config', default=os.environ.get('RELAY_CONFIG'),
                    help='template file rendered with the same placeholders '
                         'into the work dir for each relay run; its path is '
                         'the {config} placeholder of RELAY_CMD (env RELAY_CONFIG)')
    ap.add_argument('--start-timeout', type=float, default=30,
                    help='seconds the relay gets to show a 220 banner')
    ap.add_argument('--downstream', choices=['smtp', 'lmtp'], default='smtp',
                    help='protocol the sink speaks (lmtp: smtp-sink -L)')
    ap.add_argument('--no-warmup', action='store_true',
                    help='skip the one warm-up message before each measurement')
    ap.add_argument('--out', default=None,
                    help='JSON results file (default results/<time>.json '
                         'next to run.py)')
    ap.add_argument('--py-spy', metavar='PATH', default=None,
                    help='profile each one-process relay run with this py-spy '
                         'binary (py-spy record --format raw, 1000 Hz); the '
                         'summary goes to the JSON and below the tables')
    ap.add_argument('--keep', action='store_true',
                    help='keep the work dir (configs, logs) after the run')
    ap.add_argument('--cleanup-only', action='store_true',
                    help='stop servers left by a crashed earlier run, then exit')
    ap.add_argument('--report', nargs='+', metavar='JSON',
                    help='print one table from earlier results files (no runs)')
    a = ap.parse_args()
    if a.systems is None:
        a.systems = ','.join(DEFAULT_SYSTEMS) + (',relay' if a.relay_cmd else '')
    a.systems = [s.strip() for s in a.systems.split(',') if s.strip()]
    a.workloads = [w.strip() for w in a.workloads.split(',') if w.strip()]
    for s in a.systems:
        if s not in SYSTEMS:
            ap.error(f'unknown system {s!r}')
    a.workloads = [x for w in a.workloads for x in ALIASES.get(w, [w])]
    for w in a.workloads:
        if w not in WORKLOADS:
            ap.error(f'unknown workload {w!r}')
    if 'relay' in a.systems and not a.relay_cmd:
        ap.error('system "relay" needs --relay-cmd or RELAY_CMD')
    if a.relay_config:
        if not os.path.isfile(a.relay_config):
            ap.error(f'--relay-config: no such file {a.relay_config!r}')
        a.relay_config = os.path.abspath(a.relay_config)
    if not 1 <= a.repeat <= 10:
        ap.error('--repeat must be 1..10')
    return a


def main():
    args = parse_args()
    if args.report:
        return report(args.report)
    os.makedirs(WORK_BASE, exist_ok=True)
    cleanup_leftovers()
    if args.cleanup_only:
        return 0
    for tool in ('smtp-source', 'smtp-sink'):
        if not shutil.which(tool):
            sys.exit(f'{tool} not found: run benchmarks/setup.sh (apt-get install postfix)')
    raise_nofile()
    stamp = time.strftime('%Y%m%d-%H%M%S')
    run_dir = os.path.join(WORK_BASE, f'run-{stamp}-{os.getpid()}')
    os.makedirs(run_dir)
    reg = Registry(run_dir)

    def on_signal(signum, frame):
        raise KeyboardInterrupt(f'signal {signum}')
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    idle_busy = background_busy()
    if idle_busy > 15:
        log(f'WARNING: the box is already {idle_busy:.0f}% busy (of all '
            f'{os.cpu_count()} cores) before any server starts: numbers will '
            'be lower and noisier than on an idle machine')
    rows = []
    t_all = time.monotonic()
    pki = None
    try:
        if any(WORKLOADS[w].get('tls_down') or WORKLOADS[w].get('tls_up')
               for w in args.workloads):
            if not shutil.which('stunnel'):
                sys.exit('stunnel not found: run benchmarks/setup.sh '
                         '(apt-get install stunnel4)')
            pki = make_pki(os.path.join(run_dir, 'pki'))
        for rep in range(1, args.repeat + 1):
            for wl in args.workloads:
                for system in workload_systems(
                        WORKLOADS[wl].get('extra_systems', ()), args.systems):
                    log(f'run {rep}/{args.repeat}: workload {wl} '
                        f'({WORKLOADS[wl]["desc"]}) on {system}')
                    row = one_run(system, wl, rep, args, reg, run_dir, pki)
                    rows.append(row)
                    log(f'  -> {row["status"]} e2e={fmt(row.get("e2e_s"), ".3f")}s '
                        f'accept={fmt(row.get("accept_s"), ".3f")}s '
                        f'rss={fmt((row.get("peak_rss_kb") or 0) / 1024, ".1f")}MB '
                        f'{row["note"].strip()}')
    except KeyboardInterrupt:
        log('interrupted: stopping everything this run started')
    finally:
        reg.stop_all()
        if not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)
        else:
            log(f'work dir kept: {run_dir}')
    derive(rows)
    rows = order(rows)
    out = args.out or os.path.join(HERE, 'results', f'{stamp}.json')
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    meta = dict(started=stamp, seconds=round(time.monotonic() - t_all, 1),
                relay_name=args.relay_name, relay_config=args.relay_config,
                idle_busy_pct_before=round(idle_busy, 1),
                argv=sys.argv[1:], downstream=args.downstream,
                relay_cmd=args.relay_cmd if 'relay' in args.systems else None,
                versions=versions(), workloads=WORKLOADS)
    with open(out, 'w') as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1, default=str)
    print()
    print(f'SMTP relay benchmark {stamp}  downstream={args.downstream}  '
          f'({meta["seconds"]} s, results: {os.path.relpath(out)})')
    print('msgs/s and wall s: until the sink has counted every message '
          '(end to end); accept: until smtp-source got its last reply.')
    print('x direct: wall / wall of direct (iv: p50 e2e latency / direct\'s); '
          'p50, p95 ms (iv): accept/e2e per message; +direct ms: p50 e2e - '
          'direct\'s.')
    print('mem: VmHWM of a one-process relay; peak of the sum of PSS for a '
          'process tree (postfix); v: the same at the plateau with 500 idle '
          'sessions (VmRSS / sum of PSS).')
    print('x pf: ratio to postfix in this run (msgs/s; mem). target: the '
          'performance targets, relay rows only. cpu%: of one core, over the wall '
          'time; other: the rest of the box.')
    print(f'box busy before start: {idle_busy:.0f}% of {os.cpu_count()} cores')
    print('versions: ' + ', '.join(f'{k} {v}' for k, v in meta['versions'].items()))
    verdicts = print_tables(rows)
    failed = [r for r in rows if r['status'] not in ('ok', 'skip')]
    if failed:
        print()
        for r in failed:
            print(f'FAILED: workload {r["workload"]} on {r["system"]} '
                  f'(run {r["rep"]}): {r["note"].strip()}')
        print(f'FAIL: {len(failed)} run(s) failed (every message must reach '
              'the sink): exit status 1')
        return 1
    if 'FAIL' in verdicts:
        print()
        print(f'FAIL: {verdicts.count("FAIL")} performance target(s) '
              'missed: exit status 3')
        return 3
    return 0


def raise_nofile():
    """Workload v holds 500 sessions (sockets here and in the relay, which
    inherits this limit): raise the soft limit of open files to the hard."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError) as e:
            log(f'cannot raise RLIMIT_NOFILE from {soft}: {e}')
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != resource.RLIM_INFINITY and soft < 2 * WORKLOADS['v']['sessions'] + 100:
        log(f'WARNING: RLIMIT_NOFILE is {soft}: too low for workload v')


if __name__ == '__main__':
    sys.exit(main())
