"""bench/layers.py: perf's report lines folded into layers the reader recognizes."""

from __future__ import annotations

from bench.layers import _SHARE, by_layer, wakeup_share


def _rows(text: str) -> list[tuple[float, str]]:
    return [(float(m.group(1)), m.group(2)) for line in text.splitlines() if (m := _SHARE.match(line))]


def test_shared_objects_fold_into_layers_and_the_rest_is_other() -> None:
    rows = _rows(
        """
    62.46%  libpython3.11.so.1.0
    27.96%  [kernel.kallsyms]
     3.35%  loop.cpython-311-x86_64-linux-gnu.so
     1.80%  parser.cpython-311-x86_64-linux-gnu.so
     2.45%  libc.so.6
     0.36%  [vdso]
     0.62%  _multidict.cpython-311-x86_64-linux-gnu.so
"""
    )
    assert by_layer(rows) == {
        "CPython interpreter": 62.5,
        "kernel": 28.0,
        "uvloop / libuv": 3.4,
        "httptools / llhttp": 1.8,
        "C library": 2.8,
        "other": 0.6,
    }
    assert by_layer(_rows("    69.96%  envoy\n    25.66%  [kernel.kallsyms]\n")) == {"Envoy": 70.0, "kernel": 25.7}


def test_the_wakeup_share_is_the_inclusive_share_of_sock_def_readable() -> None:
    rows = _rows(
        """
    27.94%     0.31%  [k] do_syscall_64
    17.28%     0.10%  [k] sock_def_readable
     1.21%     0.01%  [k] ksys_read
"""
    )
    assert wakeup_share(rows) == 17.28
    assert wakeup_share(rows[:1]) == 0.0
