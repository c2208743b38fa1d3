"""The M-adapter branch and its baselines: shapes, parameters, temporal order, checkpoints."""

from __future__ import annotations

import pytest
import torch

from mad.adapt.checkpoint import CheckpointError, load_model, load_state, save_model
from mad.adapt.branch import BranchConfig, count_parameters
from mad.adapt.families import build_model
from mad.adapt.madapter import Correlation, SpaceTimeConv, TemporalConv
from mad.errors import MadError
from mad.cache.inputs import average_cells, branch_inputs, normalized_cells, resolve_cell_size

ARCHS = ("madapter", "meanpool", "linear")  # this file's archs (evl: tests/test_evl.py; all: test_families.py)

SMALL = dict(width=16, heads=2, dropout=0.0)


def branch(arch, num_levels, in_width, num_tokens, num_frames, num_classes, **settings):
    return build_model(BranchConfig(arch, num_levels, in_width, num_tokens, num_frames, num_classes, **settings))


def levels_for(num_levels, batch=2, frames=4, tokens=17, width=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, frames, tokens, width, generator=g) for _ in range(num_levels)]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("num_levels", [1, 2, 3])
@pytest.mark.parametrize("grid", [(1, 1), (2, 3), (4, 4)])
def test_shapes_every_arch_levels_and_grid(arch, num_levels, grid):
    tokens = 1 + grid[0] * grid[1]
    square = grid[0] == grid[1]
    model = branch(arch, num_levels, 24, tokens, 4, 5, **SMALL, correlation=1 if square else 0)
    logits = model(levels_for(num_levels, tokens=tokens))
    assert logits.shape == (2, 5)
    logits.sum().backward()
    grads = dict((name, p.grad) for name, p in model.named_parameters())
    # every parameter gets a gradient (zero where a zero-initialised output hides it at the start), except the
    # fusion's gates with one level: nothing to weigh
    unused = {"fusion.gates"} if num_levels == 1 and arch in ("madapter", "meanpool") else set()
    assert {name for name, grad in grads.items() if grad is None} == unused
    assert all(torch.isfinite(grad).all() for grad in grads.values() if grad is not None)
    assert sum(grad.abs().sum() for grad in grads.values() if grad is not None) > 0


@pytest.mark.parametrize("options", [dict(temporal="attn"), dict(temporal="conv3d"), dict(temporal="none"),
                                     dict(motion=False), dict(correlation=0), dict(correlation=2),
                                     dict(depth=2, kernel_size=5)])
def test_madapter_variants(options):
    model = branch("madapter", 2, 24, 10, 4, 3, **SMALL, **options)
    assert model(levels_for(2, tokens=10)).shape == (2, 3)


def test_parameter_counts_grow_with_the_branch():
    counts = {arch: count_parameters(branch(arch, 3, 768, 197, 8, 400)) for arch in ARCHS}
    assert counts["linear"] == 768 * 400 + 400 + 2 * 768  # LayerNorm + Linear
    assert counts["linear"] < counts["meanpool"] < counts["madapter"]
    assert counts["madapter"] < 6_000_000  # a small branch beside an 86M-parameter ViT-B


def test_temporal_conv_starts_as_identity():
    module = TemporalConv(16)
    x = torch.randn(2, 5, 7, 16)
    assert torch.equal(module(x), x)


def test_space_time_conv_starts_as_identity_and_mixes_neighbouring_patches():
    module = SpaceTimeConv(16)
    x = torch.randn(2, 5, 1 + 3 * 3, 16)
    assert torch.equal(module(x), x)
    with torch.no_grad():  # a box filter and an identity output, to see the kernel's reach
        module.conv.weight.fill_(1.0)
        module.conv.bias.zero_()
        module.proj.weight.copy_(torch.eye(16))
    x = torch.zeros(2, 5, 1 + 3 * 3, 16)
    x[:, 2, 1 + 4] = torch.randn(16)  # one patch (the centre of the 3x3 grid) at one frame
    changed = (module(x) - x).abs().sum(dim=-1) > 0  # [B, T, N]
    assert changed[:, 1:4, 1:].all()  # every patch of frames 1..3
    assert not changed[:, 0].any() and not changed[:, 4].any() and not changed[:, :, 0].any()  # not CLS
    with pytest.raises(ValueError, match="square patch grid"):
        module(torch.randn(1, 2, 1 + 6, 16))


def test_correlation_finds_where_a_patch_came_from():
    """A distinct patch moves one patch to the right: at its new place it matches the old one, to its left."""
    module = Correlation(1, 8, 8, radius=1, groups=1)
    side, T = 5, 3
    background = torch.randn(8)
    x = background.expand(1, T, 1 + side * side, 8).clone()  # every patch the same...
    thing = torch.randn(8)
    for t in range(T):
        x[0, t, 1 + 2 * side + (1 + t)] = thing  # ...but one, at row 2, column 1 + t
    module.proj = torch.nn.Identity()  # read the features: [p (9 offsets), p*x, p*y]
    features = module(module.match([x]))
    assert features.shape == (1, T, 1 + side * side, 27)
    assert torch.equal(features[:, :, 0], torch.zeros(1, T, 27))  # CLS
    p = features[0, 1, 1 + 2 * side + 2, :9]  # the patch's new place at t = 1
    assert p.argmax().item() == 3  # offset (dy, dx) = (0, -1): it came from the left
    x_weighted = features[0, 1, 1 + 2 * side + 2, 9:18]
    assert torch.allclose(x_weighted, p * 0.0)  # column 2 of 5 is x = 0
    p_right = features[0, 1, 1 + 2 * side + 4, :9]  # a background patch at column 4 (x = 1)
    assert torch.allclose(features[0, 1, 1 + 2 * side + 4, 9:18], p_right)
    moving_left = x.flip(1)  # the same clip backwards: the peak is on the other side
    q = module(module.match([moving_left]))[0, 1, 1 + 2 * side + 2, :9]
    assert q.argmax().item() == 5  # offset (0, +1): it came from the right


@pytest.mark.parametrize("cell", [1, 2])
def test_projection_of_cells_keeps_no_copy_but_gives_autograd_gradients(cell):
    from mad.adapt.layers import LevelProjection

    torch.manual_seed(0)
    projection = LevelProjection(24, 8)
    norm, linear = torch.nn.LayerNorm(24, elementwise_affine=False), torch.nn.Linear(24, 8)
    linear.load_state_dict(projection.proj.state_dict())

    def reference(x):  # project every patch, then average the grid (what averaging first must equal)
        return average_cells(linear(norm(x)), cell)

    x = (torch.randn(2, 3, 1 + 5 * 5, 24) * 3 + 1).half()  # a cached level: no gradient wanted
    cells = normalized_cells(x, cell)
    assert cells.dtype == torch.float16 and cells.shape == (2, 3, 1 + (3 if cell == 2 else 5) ** 2, 24)
    target = torch.randn(2, 3, cells.shape[2], 8)
    assert torch.allclose(cells.float(), average_cells(norm(x.float()), cell), atol=4e-3)  # float16 of LN + cells
    ((projection(cells, normalized=True) - target) ** 2).sum().backward()
    ((linear(cells.float()) - target) ** 2).sum().backward()  # autograd on the same cells
    for mine, theirs in zip(projection.proj.parameters(), linear.parameters()):
        assert torch.allclose(mine.grad, theirs.grad, rtol=1e-5, atol=1e-4)
    assert torch.allclose(projection(cells, normalized=True), reference(x.float()), atol=5e-3)
    raw = x.float().requires_grad_(True)  # a level that does want a gradient takes autograd's path and gets one
    projection(raw).sum().backward()
    assert raw.grad is not None and raw.grad.abs().sum() > 0


def test_branch_inputs_are_what_the_branch_reads_of_full_levels():
    levels = levels_for(2, tokens=1 + 6 * 6)
    inputs = branch_inputs(levels, cell=2, radius=1, groups=4)
    assert [c.shape for c in inputs.cells] == [(2, 4, 1 + 3 * 3, 24)] * 2
    assert inputs.similarity.shape == (2, 4, 6, 6, 2 * 4, 9)
    assert torch.equal(inputs.cls[1], levels[1][:, :, 0]) and torch.allclose(inputs.token_mean[0],
                                                                            levels[0].mean(dim=2))
    model = branch("madapter", 2, 24, 1 + 6 * 6, 4, 3, **SMALL, cell_size=2).eval()
    assert torch.equal(model(levels), model(inputs))  # the model reads full levels through the same inputs


def test_mlp_gradients_equal_autograd_through_gelu():
    from mad.adapt.layers import Mlp

    torch.manual_seed(0)
    mlp = Mlp(16, 64)
    x = torch.randn(3, 7, 16, requires_grad=True)
    mlp(x).pow(2).sum().backward()
    mine = [x.grad.clone()] + [p.grad.clone() for p in mlp.parameters()]
    x.grad = None
    mlp.zero_grad()
    mlp.fc2(torch.nn.functional.gelu(mlp.fc1(x))).pow(2).sum().backward()
    theirs = [x.grad] + [p.grad for p in mlp.parameters()]
    for a, b in zip(mine, theirs):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_correlation_matches_on_every_level_at_the_full_grid_when_the_branch_pools_it():
    """The thing moves by one patch of a 6x6 grid: less than a cell of the branch's pooled 3x3 grid."""
    side, T = 6, 2
    pooled = Correlation(2, 8, 8, radius=1, groups=1, cell=2)
    full = Correlation(2, 8, 8, radius=1, groups=1)
    pooled.proj = full.proj = torch.nn.Identity()
    torch.manual_seed(0)
    x = torch.randn(8).expand(1, T, 1 + side * side, 8).clone()
    thing = torch.randn(8)
    x[0, 0, 1 + 0 * side + 0] = thing  # row 0, column 0, then column 1
    x[0, 1, 1 + 0 * side + 1] = thing
    still = torch.randn(1, 1, 1 + side * side, 8).expand(1, T, -1, -1).clone()  # a second level: nothing moves
    features = full(full.match([x, still]))
    assert features.shape == (1, T, 1 + side * side, 2 * 27)
    assert features[0, 1, 1 + 1, :9].argmax().item() == 3  # level 1: it came from the left
    assert features[0, 1, 1 + 1, 27:36].argmax().item() == 4  # level 2 (its p follows level 1's 27): it stayed
    cells = pooled(pooled.match([x, still]))
    assert cells.shape == (1, T, 1 + 3 * 3, 2 * 27)
    # the pooled cell (0, 0) is the mean of its four patches' features
    expected = features[:, :, 1:].reshape(1, T, 3, 2, 3, 2, 54)[:, :, 0, :, 0].mean(dim=(2, 3))
    assert torch.allclose(cells[:, :, 1], expected, atol=1e-6)
    assert torch.equal(cells[:, :, 0], torch.zeros(1, T, 54))  # CLS


def test_pool_grid_averages_cells_and_keeps_cls():
    x = torch.randn(2, 3, 1 + 7 * 7, 5)
    y = average_cells(x, 2)
    assert y.shape == (2, 3, 1 + 4 * 4, 5)  # 7 -> 4: the last row and column have one patch per cell side
    grid = x[:, :, 1:].reshape(2, 3, 7, 7, 5)
    assert torch.equal(y[:, :, 0], x[:, :, 0])
    assert torch.allclose(y[:, :, 1 + 0], grid[:, :, 0:2, 0:2].mean(dim=(2, 3)), atol=1e-6)
    assert torch.allclose(y[:, :, 1 + 3], grid[:, :, 0:2, 6].mean(dim=2), atol=1e-6)  # cell (0, 3)
    assert torch.allclose(y[:, :, 1 + 15], grid[:, :, 6, 6], atol=1e-6)  # cell (3, 3): one patch
    assert torch.equal(average_cells(x, 1), x)


@pytest.mark.parametrize("side, expected", [(14, 2), (16, 2), (24, 3), (28, 4), (8, 1), (7, 1), (4, 1)])
def test_grid_pool_auto_keeps_at_least_7_patches_per_side(side, expected):
    assert resolve_cell_size("auto", 1 + side * side) == expected
    assert resolve_cell_size("3", 1 + side * side) == 3 and resolve_cell_size(1, 1 + side * side) == 1
    assert resolve_cell_size("auto", 1 + 2 * 7) == 1  # not a square grid: nothing to pool
    for bad in ("0", "two", -1):
        with pytest.raises(ValueError, match="cell_size"):
            resolve_cell_size(bad, 1 + side * side)


@pytest.mark.slow
def test_pooled_branch_runs_its_blocks_on_the_pooled_grid_and_learns():
    torch.manual_seed(0)
    model = branch("madapter", 2, 24, 1 + 6 * 6, 4, 3, **SMALL, cell_size=2)
    seen = []
    model.blocks[0].register_forward_hook(lambda module, args, out: seen.append(out.shape))
    levels = levels_for(2, tokens=1 + 6 * 6)
    logits = model(levels)
    assert seen == [(2, 4, 1 + 3 * 3, 16)] and logits.shape == (2, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    labels = torch.tensor([0, 2])
    losses = []
    for _ in range(20):
        loss = torch.nn.functional.cross_entropy(model(levels), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_correlation_and_grid_pooling_need_a_square_grid():
    with pytest.raises(ValueError, match="square patch grid.*correlation 0 and cell size 1"):
        branch("madapter", 2, 24, 1 + 2 * 3, 4, 3, **SMALL, correlation=1)
    with pytest.raises(ValueError, match="square patch grid"):
        branch("madapter", 2, 24, 1 + 2 * 3, 4, 3, **SMALL, correlation=0, cell_size=2)
    model = branch("madapter", 2, 24, 1 + 2 * 3, 4, 3, **SMALL, correlation=0)  # auto: no pooling
    assert model(levels_for(2, tokens=7)).shape == (2, 3)


def test_madapter_sees_frame_order_and_linear_does_not():
    levels = levels_for(2)
    reversed_levels = [x.flip(1) for x in levels]
    torch.manual_seed(0)
    madapter = branch("madapter", 2, 24, 17, 4, 3, **SMALL).eval()
    linear = branch("linear", 2, 24, 17, 4, 3, **SMALL).eval()
    assert not torch.allclose(madapter(levels), madapter(reversed_levels))
    assert torch.allclose(linear(levels), linear(reversed_levels), atol=1e-6)


def test_unknown_arch_and_bad_heads_are_refused():
    with pytest.raises(MadError, match=r"--arch 'resnet': not a registered branch family \(use madapter, meanpool, "
                                        "linear, evl"):
        branch("resnet", 1, 8, 5, 4, 2)
    with pytest.raises(ValueError, match="divisible"):
        branch("madapter", 1, 8, 5, 4, 2, width=10, heads=3)


def test_checkpoint_round_trip(tmp_path):
    cfg = BranchConfig(arch="madapter", num_levels=2, in_width=24, num_tokens=17, num_frames=4, num_classes=3,
                       **SMALL)
    model = build_model(cfg).eval()
    save_model(model, tmp_path / "model.safetensors", cfg, {"class_names": ["a", "b", "c"]})
    loaded, info = load_model(tmp_path / "model.safetensors")
    assert info["class_names"] == ["a", "b", "c"] and info["branch"] == cfg
    levels = levels_for(2)
    assert torch.equal(model(levels), loaded(levels))


def test_checkpoint_with_other_shapes_is_refused(tmp_path):
    small = branch("madapter", 2, 24, 17, 4, 3, **SMALL)
    wider = branch("madapter", 2, 24, 17, 4, 3, width=32, heads=2)
    with pytest.raises(CheckpointError, match=r"model.safetensors: checkpoint does not match the model \(shapes"):
        load_state(wider, small.state_dict(), "model.safetensors")


def test_foreign_files_are_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match="plain.safetensors: not a mad model"):
        load_model(tmp_path / "plain.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        load_model(tmp_path / "junk.safetensors")
    with pytest.raises(CheckpointError, match="no such model file"):
        load_model(tmp_path / "missing.safetensors")


@pytest.mark.slow
def test_branch_inputs_are_float32_work_also_under_cpu_bf16_autocast():
    """ViT-B-sized levels are split clip by clip on CPU: the float16 pieces must still be joined under autocast."""
    levels = [torch.randn(2, 8, 197, 768).half() for _ in range(2)]
    model = branch("madapter", 2, 768, 197, 8, 3, width=32, heads=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(levels)
    reference = branch_inputs(levels, cell=2, radius=1, groups=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = branch_inputs(levels, cell=2, radius=1, groups=4)
    assert logits.shape == (2, 3) and torch.equal(inside.cells[0], reference.cells[0])
    assert inside.similarity.dtype == torch.float32 and torch.equal(inside.similarity, reference.similarity)
