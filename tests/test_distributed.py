"""fastrepa.distributed outside torchrun: one process is rank 0 of 1, the collectives are no-ops, and the
device choice names the caller in its errors."""
import pytest
import torch

from fastrepa import distributed


def test_one_process_collectives_are_no_ops():
    assert not distributed.is_distributed()
    assert (distributed.rank(), distributed.world_size()) == (0, 1)
    distributed.barrier()
    t = torch.tensor([1.0, 2.0])
    assert distributed.all_reduce_sum(t) is t and t.tolist() == [1.0, 2.0]
    env = distributed.setup("cpu")
    assert (env.rank, env.world_size, env.backend, env.device) == (0, 1, None, torch.device("cpu"))
    env.barrier()


def test_resolve_device():
    assert distributed.resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert distributed.resolve_device(None).type == expected
    with pytest.raises(ValueError, match="--device 'gpu0': expected 'cpu', 'cuda' or 'cuda:N'"):
        distributed.resolve_device("gpu0", "--device")
    with pytest.raises(ValueError, match="DALI loader device meta: expected 'cpu' or a CUDA device"):
        distributed.resolve_device("meta", "DALI loader device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda_names_the_flag():
    with pytest.raises(ValueError, match="--device cuda: CUDA is not available here"):
        distributed.resolve_device("cuda", "--device")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: a cuda device without an index")
def test_cuda_index_from_the_local_rank():
    n = torch.cuda.device_count()
    assert distributed.resolve_device("cuda", index=n + 1) == torch.device("cuda", (n + 1) % n)
