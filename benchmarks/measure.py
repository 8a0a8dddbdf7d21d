"""Measuring a run: the relay's process tree sampled for memory and CPU,
and py-spy sampling the relay's Python stacks (--py-spy)."""

import os
import signal
import subprocess
import threading
import time

import pyspy
from common import CLK_TCK, WRAPPERS, kb, proc_stat, proc_status, pss_kb, tree


class Sampler(threading.Thread):
    """Peak memory and CPU of a relay's process tree (10 Hz).

    One process: its VmHWM (the kernel's peak RSS, exact). A tree of
    processes (Postfix: master, smtpd, cleanup, qmgr, smtp, ...): the peak
    over samples of the sum of their PSS, so that the shared libraries that
    every Postfix process maps are counted once (the sum of RSS, which counts
    them in every process, is kept as peak_rss_sum_kb)."""

    def __init__(self, roots, interval=0.1):
        super().__init__(daemon=True)
        self.roots, self.interval = roots, interval
        self.stop_ev = threading.Event()
        self.hwm = {}        # pid -> max VmHWM kB
        self.names = {}
        self.peak_sum = 0    # max over samples of sum(VmRSS) kB
        self.peak_pss = 0    # max over samples of sum(Pss) kB
        self.ticks0 = {}     # pid -> ticks at window start
        self.ticks = {}      # pid -> last ticks seen
        self.max_procs = 0
        self.sample(first=True)

    def sample(self, first=False):
        total, n, live = 0, 0, []
        for pid in tree(self.roots):
            s = proc_status(pid)
            st = proc_stat(pid)
            if not s or not st:
                continue
            name = s.get('Name', '?')
            if name in WRAPPERS:
                continue
            n += 1
            live.append(pid)
            self.names[pid] = name
            self.hwm[pid] = max(self.hwm.get(pid, 0), kb(s.get('VmHWM')))
            total += kb(s.get('VmRSS'))
            if first:
                self.ticks0[pid] = st[2]
            self.ticks[pid] = st[2]
        self.peak_sum = max(self.peak_sum, total)
        self.max_procs = max(self.max_procs, n)
        pss = 0
        if n > 1:  # only a tree needs PSS; one process has its exact VmHWM
            pss = sum(pss_kb(p) for p in live)
            self.peak_pss = max(self.peak_pss, pss)
        if first:  # memory when the load starts (after start-up and warm-up)
            self.start_kb = pss if n > 1 else total

    def run(self):
        while not self.stop_ev.wait(self.interval):
            self.sample()

    def current(self):
        """Memory now: (VmRSS of the one process, or sum of PSS over the
        tree; sum of VmRSS over the tree; number of processes)."""
        rss, live = 0, []
        for pid in tree(self.roots):
            s = proc_status(pid)
            if not s or s.get('Name', '?') in WRAPPERS:
                continue
            live.append(pid)
            rss += kb(s.get('VmRSS'))
        if len(live) > 1:
            return sum(pss_kb(p) for p in live), rss, len(live)
        return rss, rss, len(live)

    def finish(self):
        self.stop_ev.set()
        self.join(5)
        self.sample()
        cpu = sum(t - self.ticks0.get(p, 0) for p, t in self.ticks.items())
        by_name = {}
        for p, t in self.ticks.items():
            name = self.names.get(p, '?')
            by_name[name] = by_name.get(name, 0) + (t - self.ticks0.get(p, 0)) / CLK_TCK
        single = max(self.hwm.values(), default=0)
        multi = len(self.hwm) > 1
        return dict(peak_rss_kb=self.peak_pss if multi else single,
                    start_mem_kb=self.start_kb,
                    mem_basis='sum of PSS over the process tree' if multi
                    else 'VmHWM of the process',
                    peak_rss_sum_kb=self.peak_sum,
                    peak_pss_sum_kb=self.peak_pss,
                    max_single_hwm_kb=single,
                    procs=self.max_procs,
                    cpu_s=cpu / CLK_TCK,
                    cpu_by_process_s={k: round(v, 2) for k, v in
                                      sorted(by_name.items(), key=lambda x: -x[1])},
                    top=sorted(((self.names[p], h) for p, h in self.hwm.items()),
                               key=lambda x: -x[1])[:4])


class PySpy:
    """py-spy sampling the relay (a separate process: the relay runs at
    full speed) from the start of the load to its end."""

    def __init__(self, exe, pid, reg, out):
        self.out, self.reg = out, reg
        cmd = [exe, 'record', '--format', 'raw', '--rate', '1000',
               '--nonblocking', '--pid', str(pid), '-o', out]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        self.entry = reg.add(self.proc.pid, 'popen', cmd)
        time.sleep(0.5)   # it attaches before the load starts

    def finish(self):
        """Stop it (SIGINT: it writes its file) and summarize the file."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.reg.remove(self.entry)
        if not os.path.exists(self.out):
            return None
        summary = pyspy.summarize(self.out)
        summary['file'] = self.out
        return summary
