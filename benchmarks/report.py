"""The report of a run (or of earlier results files): the derived figures
(ratios to direct and to Postfix, CPU per message), the table of every run,
the summary over the runs, the verdicts against the performance targets,
the py-spy summaries, and the versions of everything measured."""

import json
import os
import statistics
import subprocess
import sys

from common import AIOSMTPD_PY, HARAKA_BIN, HERE, MB
from workloads import WORKLOADS

# The performance targets for one relay process (the "relay" system's rows)
TARGETS = {
    'i':   'msg/s >= 1.5x postfix and >= 1.3x aiosmtpd',
    'ii':  'msg/s >= 1.0x postfix',
    'iii': 'peak RSS <= 40 MB; growth over idle <= 1 MB',
    'iv':  'p50 <= direct + 1 ms',
    'v':   'RSS <= 150 MB with 500 idle sessions, and still serving',
    'vi':  'msg/s >= 3.5x postfix-reuse; >= 0.8x its own i (TLS costs <= 20%)',
    'vii-10': 'msg/s >= 2x postfix',
    'vii-1': 'msg/s >= 1.2x postfix',
    'viii': 'two processes: msg/s >= 1.6x one process and >= 6x postfix',
}


def fmt(v, spec, empty='-'):
    return empty if v is None else format(v, spec)


def kind_of(r):
    return r.get('kind') or WORKLOADS.get(r['workload'], {}).get('kind', 'source')


def mem_kb(r):
    """The memory figure of a row: the RSS at the plateau for v (500 idle
    sessions), else the peak (VmHWM of one process / peak sum of PSS of a
    process tree)."""
    if kind_of(r) == 'idle':
        return r.get('plateau_mem_kb')
    return r.get('peak_rss_kb')


def _mean(rows, key):
    vals = [key(r) for r in rows or ()]
    vals = [v for v in vals if v is not None]
    return statistics.mean(vals) if vals else None


def _ok_groups(rows):
    ok = {}
    for r in rows:
        if r['status'] == 'ok':
            ok.setdefault((r['workload'], r['system']), []).append(r)
    return ok


def derive(rows):
    for r in rows:
        msgs_rate = kind_of(r) != 'idle'   # v: msgs/s means nothing
        r['accept_mps'] = (r['msgs'] / r['accept_s']
                           if msgs_rate and r.get('accept_s') else None)
        r['e2e_mps'] = (r['msgs'] / r['e2e_s']
                        if msgs_rate and r.get('e2e_s') else None)
    ok = _ok_groups(rows)
    for r in rows:
        w, kind = r['workload'], kind_of(r)
        d, pf = ok.get((w, 'direct')), ok.get((w, 'postfix'))
        r['x_direct'] = r['x_postfix_mps'] = r['x_postfix_mem'] = None
        r['p50_vs_direct_ms'] = None
        if r['status'] == 'ok':
            if kind == 'latency':
                base = _mean(d, lambda x: x.get('p50_e2e_ms'))
                if base:
                    r['x_direct'] = r['p50_e2e_ms'] / base
                    r['p50_vs_direct_ms'] = round(r['p50_e2e_ms'] - base, 3) or 0.0
            elif kind == 'source' and r.get('e2e_s'):
                base = _mean(d, lambda x: x.get('e2e_s'))
                if base:
                    r['x_direct'] = r['e2e_s'] / base
            if kind == 'source' and r.get('e2e_mps'):
                base = _mean(pf, lambda x: x.get('e2e_mps'))
                if base:
                    r['x_postfix_mps'] = r['e2e_mps'] / base
            base = _mean(pf, mem_kb)
            if base and mem_kb(r):
                r['x_postfix_mem'] = mem_kb(r) / base
        # the relay's CPU per message: what it costs, less sensitive than
        # msgs/s to other jobs taking the cores (Postfix: all its processes)
        r['cpu_ms_per_msg'] = (1000 * r['cpu_s'] / r['msgs']
                               if r.get('cpu_s') and msgs_rate else None)
        for k in ('cpu_s', 'sink_cpu_s', 'source_cpu_s', 'harness_cpu_s'):
            pct = None
            if r.get(k) is not None and r.get('e2e_s'):
                pct = 100 * r[k] / r['e2e_s']
            r[k.replace('_s', '_pct')] = pct
        r['target'] = None
        if r.get('is_relay') and w in TARGETS:
            r['target'], r['target_detail'] = check_target(w, [r], ok)


def check_target(w, rs, ok):
    """(PASS | FAIL | n/a, detail) for the relay rows rs of workload w
    against the performance targets; the peers' figures are the means of their ok
    runs of the same workload in the same results."""
    if not rs:
        return 'n/a', 'not run'
    bad = [r for r in rs if r['status'] != 'ok']
    if bad:
        return 'FAIL', 'run failed: ' + (bad[0]['note'].strip()[:100] or '?')

    def ref(system, key):
        return _mean(ok.get((w, system)), key)

    if w in ('i', 'ii'):
        mps = _mean(rs, lambda r: r.get('e2e_mps'))
        need = [('postfix', 1.5), ('aiosmtpd', 1.3)] if w == 'i' else [('postfix', 1.0)]
        parts, passed = [], True
        for system, factor in need:
            base = ref(system, lambda r: r.get('e2e_mps'))
            if base is None:
                if system == 'postfix':
                    return 'n/a', 'no ok postfix run to compare with'
                parts.append(f'no {system} run')
                continue
            x = mps / base
            passed = passed and x >= factor
            parts.append(f'{mps:.0f} msg/s = {x:.2f}x {system} (>= {factor})')
        return ('PASS' if passed else 'FAIL'), ', '.join(parts)
    if w == 'iii':
        m = max(r.get('peak_rss_kb') or 0 for r in rs) / 1024
        g = max(r.get('mem_growth_kb') or 0 for r in rs) / 1024
        idle = min(r.get('start_mem_kb') or 0 for r in rs) / 1024
        return (('PASS' if m <= 40 and g <= 1 else 'FAIL'),
                f'peak RSS {m:.1f} MB (<= 40) = idle {idle:.1f} MB '
                f'+ growth {g:.1f} MB (<= 1)')
    mps = _mean(rs, lambda r: r.get('e2e_mps'))

    def versus(w2, system, factor):
        base = _mean(ok.get((w2, system)), lambda r: r.get('e2e_mps'))
        if base is None:
            return None, f'no ok {system} run of {w2}'
        x = mps / base
        return x >= factor, f'{x:.2f}x {system}{"" if w2 == w else " " + w2} (>= {factor})'

    def verdict(*checks):
        """FAIL if a check failed, n/a if one could not be made, else PASS."""
        known = [c for c, _ in checks if c is not None]
        v = ('FAIL' if not all(known) else
             'n/a' if len(known) < len(checks) else 'PASS')
        return v, f'{mps:.0f} msg/s = ' + ', '.join(d for _, d in checks)
    if w == 'vi':
        return verdict(versus(w, 'postfix-reuse', 3.5),
                       versus('i', rs[0]['system'], 0.8))
    if w in ('vii-10', 'vii-1'):
        return verdict(versus(w, 'postfix', 2.0 if w == 'vii-10' else 1.2))
    if w == 'viii':
        if rs[0].get('relay_procs', 1) == 1:
            return 'n/a', f'{mps:.0f} msg/s: the one-process baseline'
        one = rs[0]['system'].removesuffix(' x2')
        return verdict(versus(w, one, 1.6), versus(w, 'postfix', 6.0))
    if w == 'iv':
        p50 = _mean(rs, lambda r: r.get('p50_e2e_ms'))
        p95 = _mean(rs, lambda r: r.get('p95_e2e_ms'))
        base = ref('direct', lambda r: r.get('p50_e2e_ms'))
        if base is None:
            return 'n/a', 'no ok direct run to compare with'
        delta = p50 - base
        return (('PASS' if delta <= 1.0 else 'FAIL'),
                f'p50 {p50:.2f} ms = direct {base:.2f} + {delta:.2f} ms (<= +1), '
                f'p95 {fmt(p95, ".2f")} ms')
    if w == 'v':
        m = max(r.get('plateau_mem_kb') or 0 for r in rs) / 1024
        served = all(r.get('served') for r in rs)
        ready = min(r.get('idle_ready') or 0 for r in rs)
        passed = m <= 150 and served and ready >= WORKLOADS['v']['sessions']
        per = _mean(rs, lambda r: r.get('per_session_kb'))
        return (('PASS' if passed else 'FAIL'),
                f'RSS {m:.1f} MB (<= 150) with {ready} idle sessions '
                f'({fmt(per, ".0f")} KB each), '
                + ('still serving' if served else 'NOT serving'))
    return 'n/a', 'no target'


HEAD = ['workload', 'system', 'rep', 'msgs/s', 'wall s', 'accept s',
        'accept msg/s', 'mem MB', 'x direct', 'msgs/s x pf', 'mem x pf',
        'p50 ms', 'p95 ms', '+direct ms', 'relay cpu%', 'cpu ms/msg', 'sink cpu%',
        'src cpu%', 'other cpu%', 'target', 'status']


def _grid(head, out):
    widths = [max(len(head[i]), *(len(x[i]) for x in out)) if out else len(head[i])
              for i in range(len(head))]
    lines = [' | '.join(h.ljust(w) for h, w in zip(head, widths)).rstrip(),
             '-+-'.join('-' * w for w in widths)]
    lines += [' | '.join(v.ljust(w) for v, w in zip(x, widths)).rstrip()
              for x in out]
    return lines


def table(rows):
    out = []
    for r in rows:
        p50 = p95 = None
        if r.get('p50_e2e_ms') is not None:
            p50 = f'{r["p50_accept_ms"]:.2f}/{r["p50_e2e_ms"]:.2f}'
        if r.get('p95_e2e_ms') is not None:
            p95 = f'{r["p95_accept_ms"]:.2f}/{r["p95_e2e_ms"]:.2f}'
        mem = mem_kb(r)
        out.append([
            r['workload'], r['system'], str(r['rep']),
            fmt(r.get('e2e_mps'), '.1f'),
            fmt(r.get('e2e_s') if kind_of(r) != 'idle' else None, '.3f'),
            fmt(r.get('accept_s') if kind_of(r) != 'idle' else None, '.3f'),
            fmt(r.get('accept_mps'), '.1f'),
            fmt(mem / 1024 if mem else None, '.1f'),
            fmt(r.get('x_direct'), '.2f'), fmt(r.get('x_postfix_mps'), '.2f'),
            fmt(r.get('x_postfix_mem'), '.2f'), p50 or '-', p95 or '-',
            fmt(r.get('p50_vs_direct_ms'), '+.2f'),
            fmt(r.get('cpu_pct'), '.0f'), fmt(r.get('cpu_ms_per_msg'), '.2f'),
            fmt(r.get('sink_cpu_pct'), '.0f'),
            fmt(r.get('source_cpu_pct'), '.0f'), fmt(r.get('other_cpu_pct'), '.0f'),
            r.get('target') or '',
            r['status'] + (f' ({r["note"].strip()[:70]})' if r['note'].strip() else ''),
        ])
    return '\n'.join(_grid(HEAD, out))


def summary(rows):
    """Mean over the runs of each workload x system; ± is half the range of
    msgs/s over those runs, in % of the mean (the run-to-run noise)."""
    groups = {}
    for r in rows:
        groups.setdefault((r['workload'], r['system']), []).append(r)
    head = ['workload', 'system', 'runs ok', 'msgs/s', '± %', 'MB/s', 'wall s',
            'accept s', 'mem MB', 'x direct', 'msgs/s x pf', 'mem x pf',
            'p50 e2e ms', 'p95 e2e ms', '+direct ms', 'cpu ms/msg']
    out = []
    for (w, s), rs in groups.items():
        ok = [r for r in rs if r['status'] == 'ok']
        run = [r for r in rs if r['status'] != 'skip']
        line = [w, s, f'{len(ok)}/{len(run)}' if run else 'skip']
        if not ok:
            out.append(line + ['-'] * (len(head) - 3))
            continue
        mps = [r['e2e_mps'] for r in ok if r.get('e2e_mps')]
        m = statistics.mean(mps) if mps else None
        half = 50 * (max(mps) - min(mps)) / m if m else None
        mem = [mem_kb(r) for r in ok if mem_kb(r)]

        def mean(key, spec):
            return fmt(_mean(ok, key), spec)
        line += [fmt(m, '.1f'), fmt(half, '.0f'),
                 fmt(m * ok[0]['size'] / MB if m else None, '.1f'),
                 fmt(_mean(ok, lambda r: r.get('e2e_s')) if mps else None, '.3f'),
                 fmt(_mean(ok, lambda r: r.get('accept_s')) if mps else None, '.3f'),
                 fmt(max(mem) / 1024 if mem else None, '.1f'),
                 mean(lambda r: r.get('x_direct'), '.2f'),
                 mean(lambda r: r.get('x_postfix_mps'), '.2f'),
                 mean(lambda r: r.get('x_postfix_mem'), '.2f'),
                 mean(lambda r: r.get('p50_e2e_ms'), '.2f'),
                 mean(lambda r: r.get('p95_e2e_ms'), '.2f'),
                 mean(lambda r: r.get('p50_vs_direct_ms'), '+.2f'),
                 mean(lambda r: r.get('cpu_ms_per_msg'), '.2f')]
        out.append(line)
    lines = ['summary (mean of runs; ± = half the range of msgs/s, % of mean; '
             'mem: max of runs)']
    return '\n'.join(lines + _grid(head, out))


def targets(rows):
    """The relay's verdicts against the performance targets, from all its runs."""
    ok = _ok_groups(rows)
    relays = []
    for r in rows:
        if r.get('is_relay') and r['system'] not in relays:
            relays.append(r['system'])
    lines, verdicts = [], []
    for name in relays:
        lines.append(f'performance targets for {name}:')
        out = []
        for w in WORKLOADS:
            rs = [r for r in rows if r['system'] == name and r['workload'] == w]
            if w not in TARGETS or not rs:
                continue
            v, detail = check_target(w, rs, ok)
            verdicts.append(v)
            out.append([w, TARGETS[w], v, detail])
        lines += ['  ' + x for x in _grid(['workload', 'target', 'verdict',
                                           'measured'], out)]
    return '\n'.join(lines), verdicts


def profiles(rows):
    """The py-spy summaries of the relay rows (--py-spy), as text."""
    lines = []
    for r in rows:
        p = r.get('profile')
        if not p:
            continue
        centres = ', '.join(f'{k} {v:.0f}%' for k, v in
                            p['centres_pct_of_busy'].items())
        top = ', '.join(f'{k} {v:.0f}%' for k, v in p['top_own_pct_of_busy'][:6])
        lines += [f'profile {r["workload"]} {r["system"]} run {r["rep"]} '
                  f'({p["samples"]} samples; shares of the busy ones): {centres}',
                  f'  own time: {top}']
    return '\n'.join(lines)


def versions():
    v = {'python': sys.version.split()[0], 'kernel': os.uname().release,
         'cpus': os.cpu_count()}
    try:
        v['postfix'] = subprocess.run(['postconf', '-d', '-h', 'mail_version'],
                                      capture_output=True, text=True,
                                      timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    try:
        with open(os.path.join(os.path.dirname(HARAKA_BIN), '..', 'package.json')) as f:
            v['haraka'] = json.load(f)['version']
        v['node'] = subprocess.run(['node', '--version'], capture_output=True,
                                   text=True, timeout=10).stdout.strip()
    except (OSError, ValueError, KeyError, subprocess.TimeoutExpired):
        pass
    try:
        v['aiosmtpd'] = subprocess.run(
            [AIOSMTPD_PY, '-c', 'import aiosmtpd; print(aiosmtpd.__version__)'],
            capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    try:  # the project's commit (a dirty tree: the relay differs from it)
        top = os.path.dirname(HERE)
        head = subprocess.run(['git', '-C', top, 'rev-parse', '--short', 'HEAD'],
                              capture_output=True, text=True, timeout=10)
        if head.returncode == 0:
            dirty = subprocess.run(['git', '-C', top, 'status', '--porcelain',
                                    '--untracked-files=no'], capture_output=True,
                                   text=True, timeout=10).stdout.strip()
            v['git'] = head.stdout.strip() + ('-dirty' if dirty else '')
    except (OSError, subprocess.TimeoutExpired):
        pass
    try:
        with open('/proc/cpuinfo') as f:
            v['cpu'] = next(l.split(':', 1)[1].strip() for l in f
                            if l.startswith('model name'))
    except (OSError, StopIteration):
        pass
    return v


def order(rows):
    wl = list(WORKLOADS)
    sy = ['direct', 'postfix', 'postfix-reuse', 'haraka', 'aiosmtpd']
    return sorted(rows, key=lambda r: (
        wl.index(r['workload']) if r['workload'] in wl else 99,
        sy.index(r['system']) if r['system'] in sy else 50, r['system'],
        str(r['rep'])))


def print_tables(rows):
    """Print the table, the summary, the verdicts and the profiles of the
    derived and ordered rows; returns the verdicts."""
    print(table(rows))
    print()
    print(summary(rows))
    text, verdicts = targets(rows)
    if text:
        print()
        print(text)
    if profiles(rows):
        print()
        print(profiles(rows))
    return verdicts


def report(files):
    rows = []
    for k, path in enumerate(files, 1):
        with open(path) as f:
            data = json.load(f)
        reps = {r['rep'] for r in data['rows']}
        for r in data['rows']:
            r['rep'] = str(k) if len(files) > 1 and reps == {1} else (
                f'{k}.{r["rep"]}' if len(files) > 1 else str(r['rep']))
            rows.append(r)
        m = data['meta']
        print(f'{k}: {path}: started {m["started"]}, {m["seconds"]} s, '
              f'downstream={m["downstream"]}, box busy before start '
              f'{m.get("idle_busy_pct_before", "?")}%, {m.get("versions")}')
    derive(rows)
    print_tables(order(rows))
    return 0
