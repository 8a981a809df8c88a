"""The process topology under simulated torchrun, SLURM and Lightning launches, and the rank-0 waits."""

from __future__ import annotations

import time

import pytest

from popstack.pipeline.distributed import Topology, shared_tmpdir, topology, wait_for
from popstack.pipeline.errors import UserError
from tests.helpers import SLURM_2_TASKS, slurm_task


@pytest.mark.parametrize("procid", [0, 1])
def test_slurm_two_tasks_pick_their_ranks(procid):
    t = topology(slurm_task(procid))
    assert (t.rank, t.local_rank, t.world_size, t.node_rank, t.launcher) == (procid, procid, 2, 0, "slurm")
    assert t.is_zero == (procid == 0)
    assert t.launch_id == topology(slurm_task(1 - procid)).launch_id  # both tasks agree on the launch


def test_slurm_second_node_is_not_rank_zero_even_with_local_id_zero():
    t = topology(slurm_task(4, localid=0, node=1, ntasks=8))
    assert (t.rank, t.local_rank, t.world_size, t.node_rank) == (4, 0, 8, 1) and not t.is_zero


def test_interactive_slurm_allocation_is_one_process():
    env = {**slurm_task(0), "SLURM_JOB_NAME": "bash"}
    assert topology(env) == Topology(0, 0, 1, 0, "single")


def test_torchrun_variables_win_over_slurm():
    env = {**slurm_task(0), "RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "GROUP_RANK": "1",
           "TORCHELASTIC_RUN_ID": "abc"}
    t = topology(env)
    assert (t.rank, t.local_rank, t.world_size, t.node_rank, t.launcher) == (3, 1, 4, 1, "torchrun")


def test_torchrun_ranks_agree_on_a_fresh_launch_id_through_the_agent_store():
    """torchrun's run id is "none" unless --rdzv-id/--standalone: the id comes from the store, new per launch."""
    from datetime import timedelta

    from torch.distributed import TCPStore

    ids = []
    for _ in range(2):  # two launches, each with its agent's store
        store = TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=10), wait_for_workers=False)
        env = {"WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "none", "TORCHELASTIC_USE_AGENT_STORE": "True",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port)}
        first, second = (topology({**env, "RANK": r, "LOCAL_RANK": r}).launch_id for r in ("0", "1"))
        assert first == second and first.startswith("torchrun-none-")
        ids.append(first)
    assert ids[0] != ids[1]


def test_lightning_children_and_first_process():
    assert topology({}) == Topology(0, 0, 1, 0, "single")
    child = topology({"LOCAL_RANK": "1", "NODE_RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "5"})
    assert (child.rank, child.world_size, child.launcher, child.is_zero) == (1, 2, "lightning", False)
    # the first process after its first Trainer has launched the others
    first = topology({"LOCAL_RANK": "0", "NODE_RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "5"})
    assert first.is_zero and first.launch_id == child.launch_id
    # a second node's first process (multi-node Lightning launch), before and after it starts its children
    assert not topology({"NODE_RANK": "1"}, devices_per_node=4).is_zero
    assert topology({"LOCAL_RANK": "2", "NODE_RANK": "1", "WORLD_SIZE": "8"}, devices_per_node=4).rank == 6


def test_bad_rank_variable_is_a_clear_error():
    with pytest.raises(UserError, match="SLURM_PROCID"):
        topology({**SLURM_2_TASKS, "SLURM_PROCID": "x"})


def test_wait_for_returns_the_value_and_times_out_with_what_it_waited_for(monkeypatch):
    calls = iter([None, False, {"ok": 1}])
    assert wait_for(lambda: next(calls), "thing", timeout_s=5, poll_s=0.01) == {"ok": 1}
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    start = time.monotonic()
    with pytest.raises(UserError, match=r"rank 1 of 2 waited 0 s for manifests/prepare.json"):
        wait_for(lambda: None, "manifests/prepare.json", timeout_s=0.2, poll_s=0.05)
    assert time.monotonic() - start < 5


def test_shared_tmpdir_is_one_folder_for_every_rank(monkeypatch, tmp_path):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_NTASKS", "POPSTACK_SHARED_TMP"):
        monkeypatch.delenv(var, raising=False)
    with shared_tmpdir(tmp_path, timeout_s=5) as first:  # a Lightning launch: rank 0 makes it, its children inherit it
        monkeypatch.setenv("LOCAL_RANK", "1")
        monkeypatch.setenv("WORLD_SIZE", "2")
        with shared_tmpdir(tmp_path, timeout_s=5) as child:
            assert child == first
        assert first.is_dir()  # a child never removes it
        monkeypatch.delenv("LOCAL_RANK")
        monkeypatch.delenv("WORLD_SIZE")
    assert not first.exists()
    for var, value in {"RANK": "1", "WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "r1"}.items():
        monkeypatch.setenv(var, value)
    with pytest.raises(UserError, match="shared temporary directory"):  # torchrun: rank 1 waits for rank 0's folder
        with shared_tmpdir(tmp_path, timeout_s=0.1):
            pass
    monkeypatch.setenv("RANK", "0")
    with shared_tmpdir(tmp_path, timeout_s=5) as zero:
        monkeypatch.setenv("RANK", "1")
        with shared_tmpdir(tmp_path, timeout_s=5) as one:
            assert one == zero
        monkeypatch.setenv("RANK", "0")
