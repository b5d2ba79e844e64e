"""imgkit consolidate (issue 15): a synthetic full equals a fresh full capture of the same state;
--into folds a link into its parent; the result keeps the child's identity so its own children
still read; kill -9 at every step leaves the old chain or the new one. Real restores, real SIGKILL."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from tests.conftest import assert_one_line_error, needs_root, run_imgkit
from tests.test_incremental import chain, cli, copy_chain, info_json, sha256_file  # noqa: F401 (fixture)

pytestmark = [needs_root, pytest.mark.root]


def restored(image, where, *extra, env=None) -> str:
    out = os.path.join(where, os.path.basename(str(image)) + ".restored")
    run_imgkit("restore", image, out, "--yes", "--progress", "none", *extra, env=env, check=True)
    return sha256_file(out)


def test_synthetic_full_equals_a_fresh_full_capture(chain, tmp_path):
    for kind, extra in (("sbs", ["--sector-by-sector"]), ("fs", [])):
        synthetic = tmp_path / f"{kind}-synthetic.imgk"
        cli("consolidate", chain[kind][3], synthetic)
        fresh = tmp_path / f"{kind}-fresh.imgk"
        cli("capture", chain["states"][3], fresh, "--chunk-size", "256K", *extra)
        doc = info_json(synthetic)
        assert len(doc["chain"]) == 1 and doc["chunks"]["parent"] == 0
        assert restored(synthetic, tmp_path) == restored(fresh, tmp_path), kind
        if kind == "sbs":
            assert restored(synthetic, tmp_path) == sha256_file(chain["states"][3])
        # The synthetic full keeps only what the chain stores: no larger than a fresh capture + a chunk.
        assert os.path.getsize(synthetic) <= os.path.getsize(fresh) + (256 << 10)


def test_the_synthetic_full_stands_in_for_the_chain_below_it(chain, tmp_path):
    images = copy_chain(chain, tmp_path / "c")
    cli("consolidate", images[2], tmp_path / "c" / "inc2-full.imgk")
    for p in images[:3]:  # full, inc1 and inc2 gone: inc3 reads through inc2's synthetic full
        os.unlink(p)
    assert restored(images[3], tmp_path) == sha256_file(chain["states"][3])
    assert [os.path.basename(x["path"]) for x in info_json(images[3])["chain"]] == ["inc3.imgk", "inc2-full.imgk"]


def test_into_folds_a_link_into_its_parent(chain, tmp_path):
    images = copy_chain(chain, tmp_path / "c")
    doc = json.loads(run_imgkit("consolidate", "--into", images[1], images[2], "--json", "--progress", "none",
                                check=True).stdout)
    assert doc["still_a_child"] and images[2] in doc["removed"] and not os.path.exists(images[2])
    assert restored(images[1], tmp_path) == sha256_file(chain["states"][2])  # inc1's file holds inc2's disk
    assert restored(images[3], tmp_path) == sha256_file(chain["states"][3])
    assert len(info_json(images[3])["chain"]) == 3
    assert json.loads(run_imgkit("verify", images[3], "--json", check=True).stdout)["ok"]
    # Folding into the full image leaves a standalone image.
    cli("consolidate", "--into", images[0], images[1])
    assert len(info_json(images[0])["chain"]) == 1
    assert restored(images[0], tmp_path) == sha256_file(chain["states"][2])
    assert restored(images[3], tmp_path) == sha256_file(chain["states"][3])


def test_into_refuses_a_parent_with_other_children_and_a_wrong_parent(chain, tmp_path):
    images = copy_chain(chain, tmp_path / "c")
    other = tmp_path / "c" / "other.imgk"
    cli("capture", chain["states"][3], other, "--base", images[1], "--sector-by-sector")
    assert_one_line_error(run_imgkit("consolidate", "--into", images[1], images[2]), 3, "other.imgk")
    assert_one_line_error(run_imgkit("consolidate", "--into", images[0], images[2]), 3, "is not the parent")
    assert_one_line_error(run_imgkit("consolidate", images[0], tmp_path / "x.imgk"), 3, "not an incremental")
    assert_one_line_error(run_imgkit("consolidate", images[3], images[1]), 3, "link of the chain")
    assert os.path.exists(images[2]) and not (tmp_path / "x.imgk").exists()


def test_encrypted_chain_consolidates_under_the_same_password(chain, tmp_path):
    env = {"IMGKIT_PASSWORD": "pw of the chain"}
    a, b, c = (tmp_path / n for n in ("a.imgk", "b.imgk", "c.imgk"))
    run_imgkit("capture", chain["states"][0], a, "--encrypt", "--sector-by-sector", "--progress", "none",
               env=env, check=True)
    run_imgkit("capture", chain["states"][1], b, "--base", a, "--sector-by-sector", "--progress", "none",
               env=env, check=True)
    run_imgkit("capture", chain["states"][2], c, "--base", b, "--sector-by-sector", "--progress", "none",
               env=env, check=True)
    full = tmp_path / "full.imgk"
    run_imgkit("consolidate", c, full, "--progress", "none", env=env, check=True)
    assert restored(full, tmp_path, env=env) == sha256_file(chain["states"][2])
    assert info_json(full, env=env)["encrypted"]
    run_imgkit("consolidate", "--into", b, c, "--progress", "none", env=env, check=True)
    assert restored(b, tmp_path, env=env) == sha256_file(chain["states"][2])
    assert json.loads(run_imgkit("verify", b, "--json", env=env, check=True).stdout)["ok"]


STEPS = ("copied", "durable", "published", "parent-volumes-removed", "child-removed")


@pytest.mark.parametrize("step", STEPS)
def test_kill_9_during_consolidate_into_leaves_the_old_chain_or_the_new(chain, tmp_path, step):
    images = copy_chain(chain, tmp_path / "c")
    cli("split", images[1], "--split-size", "1M")  # the parent has several volumes to remove too
    proc = run_imgkit("consolidate", "--into", images[1], images[2], "--progress", "none",
                      env={"IMGKIT_CRASH_AT": step})
    assert proc.returncode == -9, proc.stderr
    state = [sha256_file(s) for s in chain["states"]]
    got = restored(images[1], tmp_path)
    if got == state[1]:  # the old chain: inc1 and inc2 as they were
        assert step in ("copied", "durable")
        assert restored(images[2], tmp_path) == state[2]
    else:  # the new chain: inc1's file holds inc2's disk
        assert got == state[2] and step not in ("copied", "durable")
    assert restored(images[3], tmp_path) == state[3]  # the grandchild reads either way
    if os.path.exists(images[2]):  # running it again finishes the job (after the last step: done)
        cli("consolidate", "--into", images[1], images[2])
    assert not os.path.exists(images[2]) and not os.path.exists(images[1] + ".002")
    assert restored(images[1], tmp_path) == state[2]
    assert restored(images[3], tmp_path) == state[3]
    leftovers = [n for n in os.listdir(tmp_path / "c") if "partial" in n]
    assert step in ("copied", "durable") or not leftovers


@pytest.mark.parametrize("step", ("copied", "durable", "published"))
def test_kill_9_during_a_synthetic_full_leaves_no_image_that_looks_complete(chain, tmp_path, step):
    out = tmp_path / "full.imgk"
    proc = run_imgkit("consolidate", chain["sbs"][3], out, "--progress", "none", env={"IMGKIT_CRASH_AT": step})
    assert proc.returncode == -9
    if step == "published":
        assert restored(out, tmp_path) == sha256_file(chain["states"][3])
    else:
        assert not out.exists()
