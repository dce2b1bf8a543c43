"""The log sink on real descriptors: a deleted file is opened again at its path, a write cut short never merges
the torn line with the next one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pep.config import DecisionLogConfig
from pep.log_sink import Sink


def test_a_deleted_file_is_opened_again_at_its_path(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    sink = Sink(DecisionLogConfig(sink="file", path=str(path)))
    sink.open()
    sink.write([b"1\n"])
    path.unlink()  # `rm`: the descriptor would still take writes nobody can read
    sink.write([b"2\n"])
    assert path.read_bytes() == b"2\n"
    sink.close()


def test_a_deleted_file_whose_directory_is_gone_fails_the_write(tmp_path: Path) -> None:
    directory = tmp_path / "logs"
    directory.mkdir()
    path = directory / "audit.jsonl"
    sink = Sink(DecisionLogConfig(sink="file", path=str(path)))
    sink.open()
    path.unlink()
    directory.rmdir()
    with pytest.raises(OSError, match="deleted and cannot open"):
        sink.write([b"1\n"])
    directory.mkdir()
    sink.write([b"2\n"])
    assert path.read_bytes() == b"2\n"
    sink.close()


def test_a_write_cut_short_leaves_no_merged_line(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    os.set_blocking(read_end, False)
    try:
        sink = Sink(DecisionLogConfig(sink="file", path=str(tmp_path / "unused")))
        sink._fd = write_end  # a descriptor that takes part of a write, then EAGAIN (as a file hits EFBIG)
        while True:  # fill the pipe, then free one page of it
            try:
                os.write(write_end, b"." * 4096)
            except BlockingIOError:
                break
        os.read(read_end, 4096)
        with pytest.raises(BlockingIOError):
            sink.write([b"a" * 5000 + b"\n", b"b\n"])
        data = bytearray()
        while True:
            try:
                data += os.read(read_end, 65536)
            except BlockingIOError:
                break
        torn = data.lstrip(b".")
        assert set(torn) == {ord("a")}  # part of the first line only
        sink.write([b"c\n"])
        assert os.read(read_end, 65536) == b"\nc\n"  # the torn line is ended first
    finally:
        os.close(read_end)
        os.close(write_end)
