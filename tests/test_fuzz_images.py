"""Fuzzing real plain, encrypted and split images (issue 13, case 6; the loop is tests/fuzz_worker.py).

In the suite the loop runs IMGKIT_FUZZ_SECONDS (default 25) with seed IMGKIT_FUZZ_SEED (default a
fixed one, so a failure reproduces; set it to vary). Longer runs: IMGKIT_FUZZ_SECONDS=600. Asserted:
every case ends in an imgkit error with a one-line message, or reads back the original bytes (a
forged plain image may read as other bytes: its checksums are unkeyed, by design); the loop's peak
RSS grows by at most 100 MiB and no case takes more than 10 s. Then a sample of the detected cases
goes through the real CLI (info, verify, restore) under strace: exit 1 or 3, one line on stderr,
no traceback, bounded time and RSS, and no file opened for writing outside the test's directory."""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys

import pytest

from crypto_volumes_support import capture_in_process
from imgk_forge import run_argv_measured, run_measured

SECONDS = float(os.environ.get("IMGKIT_FUZZ_SECONDS", "25"))
SEED = int(os.environ.get("IMGKIT_FUZZ_SEED", "1313"))
MiB = 1 << 20
WORKER = os.path.join(os.path.dirname(__file__), "fuzz_worker.py")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    rng = random.Random(7)
    raw = d / "src.raw"
    data = bytearray()
    for i in range(18):  # incompressible, compressible and zero chunks of 64 KiB, and a short tail
        data += [rng.randbytes(65536), bytes(range(256)) * 256, bytes(65536)][i % 3]
    data += rng.randbytes(5000)
    raw.write_bytes(bytes(data))
    images = []
    for name, password, split in (("plain", None, None), ("encrypted", "fuzz-pw", None),
                                  ("split", None, 140 << 10), ("encrypted-split", "fuzz-pw", 140 << 10)):
        out = d / name / "img.imgk"
        out.parent.mkdir()
        paths = capture_in_process(str(raw), str(out), password=password.encode() if password else None,
                                   split_size=split, chunk_size=65536)
        images.append({"name": name, "paths": paths, "password": password, "raw": str(raw)})
    assert len(images[2]["paths"]) >= 3
    (d / "corpus.json").write_text(json.dumps(images))
    return d


def test_fuzz_structure_aware(corpus, tmp_path):
    samples = tmp_path / "samples"
    samples.mkdir()
    out = tmp_path / "result.json"
    env = {"PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(WORKER)), os.path.dirname(WORKER)]),
           "PYTHONDONTWRITEBYTECODE": "1"}
    code, stdout, stderr, rss, seconds = run_argv_measured(
        [sys.executable, WORKER, corpus / "corpus.json", SECONDS, SEED, out, samples], env=env,
        timeout=SECONDS + 120)
    result = json.loads(out.read_text()) if out.exists() else {"failure": stderr}
    print(f"fuzz seed {SEED}: {json.dumps(result)}")
    assert "failure" not in result, f"seed {SEED}: {result.get('failure')}"
    assert code == 0, stderr
    assert result["cases"] >= 50 and result["detected"] > result["cases"] // 2, result
    assert result["rss_growth"] <= 100 * MiB, result
    assert result["slowest"] < 10, result
    assert set(result["by_mutator"]) >= {"flip", "header_field", "tail_field", "truncate", "sections"}, result
    _cli_on_samples(samples, tmp_path)


def _cli_on_samples(samples, tmp_path):
    if shutil.which("strace") is None:
        pytest.skip("strace (scripts/setup.sh) checks where the CLI writes")
    root = os.path.realpath(tmp_path)
    cases = sorted(p for p in os.listdir(samples) if p.endswith(".json"))
    assert cases, "the fuzz loop kept no detected case for the CLI"
    for name in cases[:8]:
        case = json.loads((samples / name).read_text())
        env = {"IMGKIT_PASSWORD": case["password"]} if case["password"] else {}
        target = tmp_path / "restored.raw"
        for args in (["info", case["image"]], ["verify", case["image"]], ["restore", "-y", case["image"], target]):
            log = tmp_path / "writes.log"
            code, out, err, rss, seconds = run_argv_measured(
                ["strace", "-f", "-qq", "-o", log, "-e", "trace=open,openat,creat,rename,renameat,renameat2",
                 sys.executable, "-m", "imgkit", *map(str, args)],
                env=dict(env, PYTHONDONTWRITEBYTECODE="1"), timeout=60, cwd=tmp_path)
            what = f"{case['what']}: imgkit {args[0]}"
            if args[0] == "info" and code == 0:  # info reads no chunk: damage inside one is verify's
                continue
            assert code in (1, 3), (what, code, err)
            assert "Traceback" not in err and len(err.strip().splitlines()) <= 2, (what, err)  # + a hint line
            assert err.startswith("imgkit: error:") or err.startswith("DAMAGED") or "FAIL" in err or code == 1, (what, err)
            assert seconds < 30 and rss < 300 * MiB, (what, seconds, rss)
            for path in _written_paths(log.read_text()):
                real = os.path.realpath(path)
                assert real.startswith(root + os.sep) or real in ("/dev/null", "/dev/tty"), (what, path)
            assert not target.exists(), f"{what}: a restore of a damaged image left its target"


_OPEN = re.compile(r'(?:open|openat|creat)\((?:[A-Z_0-9]+, )?"([^"]+)", ([A-Z_|]+)')
_RENAME = re.compile(r'rename(?:at2?)?\((?:[A-Z_0-9]+, )?"[^"]+", (?:[A-Z_0-9]+, )?"([^"]+)"')


def _written_paths(log: str):
    for line in log.splitlines():
        if " = -1 " in line:
            continue
        m = _OPEN.search(line)
        if m and re.search(r"O_WRONLY|O_RDWR|O_CREAT|O_TRUNC", m.group(2)):
            yield m.group(1)
        m = _RENAME.search(line)
        if m:
            yield m.group(1)
