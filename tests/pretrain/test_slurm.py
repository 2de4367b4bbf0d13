"""Reading Slurm's variables: node lists, the join of an srun task, refusals. (The live cluster tests are in
tests/slurm/.)"""

import pytest

from pretrain import slurm
from pretrain.distributed import check_device, launch_rank

STEP = {
    "SLURM_JOB_ID": "41",
    "SLURM_STEP_ID": "0",
    "SLURM_STEP_NUM_TASKS": "4",
    "SLURM_PROCID": "3",
    "SLURM_LOCALID": "1",
    "SLURM_STEP_NODELIST": "localhost,n2",
}


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("n1", ["n1"]),
        ("n[1-2]", ["n1", "n2"]),
        ("gpu[01-03,07],login1", ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]),
        ("a[8-10]-ib,b1", ["a8-ib", "a9-ib", "a10-ib", "b1"]),
        ("node[098-101]", ["node098", "node099", "node100", "node101"]),
    ],
)
def test_node_lists_expand_as_scontrol_does(nodelist, hosts, monkeypatch):
    assert slurm.read_nodelist(nodelist) == hosts
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: our reading
    assert slurm.expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["", "n[1-2", "n1]", "n[a-b]", "n[1-x]"])
def test_an_unreadable_node_list_is_refused_naming_it(nodelist):
    with pytest.raises(slurm.LaunchError, match="cannot read the Slurm node list"):
        slurm.read_nodelist(nodelist)


def test_an_srun_task_joins_as_its_rank_in_the_step():
    env = slurm.join_env(STEP)
    assert env == {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "localhost",  # the first node, which resolves
        "MASTER_PORT": str(slurm.step_port(STEP)),
    }
    assert slurm.PORT_BASE <= int(env["MASTER_PORT"]) < slurm.PORT_BASE + slurm.PORT_SPAN
    assert slurm.step_port({**STEP, "SLURM_STEP_ID": "1"}) != slurm.step_port(STEP)  # another step, another port
    given = slurm.join_env({**STEP, "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "6000"})
    assert (given["MASTER_ADDR"], given["MASTER_PORT"]) == ("10.0.0.7", "6000")


def test_a_process_alone_does_not_join():
    assert slurm.join_env({}) is None
    assert slurm.join_env({**STEP, "SLURM_STEP_NUM_TASKS": "1"}) is None
    batch_shell = {k: v for k, v in STEP.items() if k != "SLURM_STEP_NUM_TASKS"} | {"SLURM_NTASKS": "4"}
    assert slurm.join_env(batch_shell) is None  # python run in the batch script itself: one process


def test_gpus_per_task_is_refused_by_every_task():
    with pytest.raises(slurm.LaunchError, match="--gpus-per-task=1 gives each task its own GPU.*--gpus-per-node"):
        slurm.join_env({**STEP, "SLURM_GPUS_PER_TASK": "1"})


def test_a_step_without_its_task_ids_is_refused():
    with pytest.raises(slurm.LaunchError, match="SLURM_PROCID is not set"):
        slurm.join_env({k: v for k, v in STEP.items() if k != "SLURM_PROCID"})


@pytest.mark.parametrize("var", ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE"])
def test_mpi_processes_without_a_rank_are_refused(var):
    with pytest.raises(slurm.LaunchError, match=f"one of 4 processes \\({var}=4\\).*train alone"):
        slurm.join_env({var: "4"})
    assert slurm.join_env({var: "1"}) is None


def test_a_world_smaller_than_its_step_is_refused():
    slurm.check_world(STEP, 4)
    slurm.check_world(STEP, 8)  # torchrun per node: more ranks than tasks
    slurm.check_world({}, 1)
    with pytest.raises(slurm.LaunchError, match="runs 4 tasks, but the launcher made a world of 1 process"):
        slurm.check_world(STEP, 1)


def test_a_node_name_that_does_not_resolve_asks_slurm(monkeypatch, tmp_path):
    scontrol = tmp_path / "scontrol"
    scontrol.write_text(
        "#!/bin/sh\n[ \"$1\" = -o ] && echo 'NodeName=n7 Arch=x86_64 NodeAddr=10.1.2.3 NodeHostName=h7 Port=6818'\n"
    )  # (`show hostnames` prints nothing: our reading of the list)
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    assert slurm.head_address("no-such-host-pretrain-test[1-2]") == "10.1.2.3"
    scontrol.write_text("#!/bin/sh\necho 'slurm_load_node error: Invalid node name specified' >&2; exit 1\n")
    with pytest.raises(slurm.LaunchError, match="gave no NodeAddr: slurm_load_node error.*Set MASTER_ADDR"):
        slurm.head_address("no-such-host-pretrain-test1")


def test_hostfile_lists_each_node_with_its_slots():
    assert slurm.hostfile("gpu[1-2]", 8) == "gpu1 slots=8\ngpu2 slots=8\n"


def test_each_rank_gets_the_device_of_its_local_rank():
    check_device(3, 8)
    with pytest.raises(
        slurm.LaunchError, match="local rank 1 has no device: this process sees 1.*--gpus-per-node"
    ) as e:
        check_device(1, 1)  # a binding that gives each task one device
    assert e.value.rank_local  # only some ranks find it: each reports it itself


def test_the_rank_a_launcher_gives_before_joining():
    assert launch_rank({}) == 0
    assert launch_rank({"RANK": "5", **STEP}) == 5
    assert launch_rank(STEP) == 3  # an srun task
    assert launch_rank({"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}) == 0  # the batch shell


def test_a_node_list_is_expanded_by_scontrol_where_it_answers(monkeypatch, tmp_path):
    scontrol = tmp_path / "scontrol"
    scontrol.write_text("#!/bin/sh\n[ \"$1 $2\" = 'show hostnames' ] && printf 'a1b3\\na1b4\\n'\n")
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    assert slurm.expand_nodelist("a1b[3-4]") == ["a1b3", "a1b4"]
