"""Where the relay spends its time, from a py-spy sampling profile.

run.py --py-spy PATH records each relay run with
``py-spy record --format raw --pid PID`` (collapsed stacks: one line per
distinct stack, ``frame;frame;...;leaf COUNT``, frames as
``function (file:line)``) while the load runs, and keeps this summary in the
row: the share of the samples in the cost centres issue 19 names, and the
functions with the most samples of their own.

    python3 benchmarks/pyspy.py FILE.txt     # the same summary, printed
"""
import re
import sys

FRAME = re.compile(r'^(?P<func>.*?) \((?P<file>[^:()]*)(?::\d+)?\)$')

# cost centres: the system calls by the leaf frame (the Python function that
# made the call: py-spy shows no C frames; Twisted's send() is
# untilConcludes(socket.send, ...) inside writeSomeData), the layers by the
# innermost frame that is either a layer's or our own (see centre); a send()
# made for the TLS layer counts as a send() call. Function names are
# compared without their class (py-spy writes Class.method).
SYSCALLS = [
    ('send() calls', lambda f, p, up: f == 'writeSomeData' or
     (f == 'untilConcludes' and up == 'writeSomeData')),
    ('recv() calls', lambda f, p, up: f == 'doRead' and p.endswith('tcp.py')),
    ('epoll wait', lambda f, p, up: f == 'doPoll'),
]
LAYERS = [
    ('TLS layer', lambda f, p: 'OpenSSL' in p or p.endswith('protocols/tls.py')
     or p.endswith('_sslverify.py')),
    # every reactor call runs inside log.callWithContext: that is no logging
    ('logging', lambda f, p: 'twisted/logger/' in p
     or p.startswith('logging/') or '/logging/' in p
     or (p.endswith('python/log.py')
         and f not in ('callWithContext', 'callWithLogger'))),
]
CENTRES = SYSCALLS + LAYERS


def centre(frames):
    """The cost centre of one stack, or None."""
    names = [(f.rsplit('.', 1)[-1], p) for f, p in frames]
    f, p = names[-1]
    up = names[-2][0] if len(names) > 1 else ''
    for name, test in SYSCALLS:
        if test(f, p, up):
            return name
    # from the leaf outwards: the first frame of a layer names it; the first
    # frame of our own code ends the search (our protocol runs inside the
    # TLS wrapper's dataReceived: that is not TLS time)
    for f, p in reversed(names):
        for name, test in LAYERS:
            if test(f, p):
                return name
        if p.startswith('smtprelay/') or '/smtprelay/' in p:
            return None
    return None


def parse(path):
    """[(frames [(func, file)], count)] from a py-spy raw file."""
    stacks = []
    with open(path, errors='replace') as f:
        for line in f:
            line = line.rstrip('\n')
            stack, _, n = line.rpartition(' ')
            if not stack or not n.isdigit():
                continue
            frames = []
            for fr in stack.split(';'):
                m = FRAME.match(fr)
                frames.append((m['func'], m['file']) if m else (fr, ''))
            stacks.append((frames, int(n)))
    return stacks


def summarize(path, top=12):
    """dict(samples=, centres={name: % of samples}, top=[(leaf, %)]);
    the idle time (epoll wait) is in the total, so the shares are of the
    wall time the relay was sampled."""
    stacks = parse(path)
    total = sum(n for _, n in stacks) or 1
    centres = {name: 0 for name, _ in CENTRES}
    own = {}
    for frames, n in stacks:
        if frames and centre(frames):
            centres[centre(frames)] += n
        if frames and centre(frames) != 'epoll wait':
            f, p = frames[-1]
            key = f'{f} ({p.rsplit("/site-packages/", 1)[-1]})'
            own[key] = own.get(key, 0) + n
    busy = total - centres['epoll wait']
    return dict(
        samples=total,
        busy_pct=round(100 * busy / total, 1),
        centres_pct_of_busy={k: round(100 * v / max(busy, 1), 1)
                             for k, v in centres.items() if k != 'epoll wait'},
        top_own_pct_of_busy=[(k, round(100 * v / max(busy, 1), 1)) for k, v in
                             sorted(own.items(), key=lambda x: -x[1])[:top]])


def main(argv):
    for path in argv:
        s = summarize(path)
        print(f'{path}: {s["samples"]} samples, busy {s["busy_pct"]}% '
              '(the rest in epoll wait); shares of the busy samples:')
        for k, v in s['centres_pct_of_busy'].items():
            print(f'  {v:5.1f}%  {k}')
        print('  own time, top functions:')
        for k, v in s['top_own_pct_of_busy']:
            print(f'  {v:5.1f}%  {k}')


if __name__ == '__main__':
    main(sys.argv[1:])
