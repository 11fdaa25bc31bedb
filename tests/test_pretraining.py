"Contracts of the pretraining chapter (vla_nb.pretraining): real loss terms, schedule, NaN detection, exact resume, torchrun DDP."
import json, math, os, socket, subprocess, sys
from pathlib import Path
import numpy as np
import pytest
import torch
from vla_nb import sim
from vla_nb.core import seed_everything, load_checkpoint
from vla_nb.data import SyntheticDataGenerator, DataConfig, EpisodeDataset, IMAGE, ACTION, OBJ_XY, OBJ_MASK, OBJECT_NAMES
from vla_nb.model import ModelConfig, VLANet, load_weights
from vla_nb.pretraining import (PretrainConfig, PretrainDataset, PretrainHeads, PretrainModel, VLAPretrainer, alignment_loss, vision_loss,
                                language_loss, warmup_cosine, epoch_indices, random_batch, bench_train, LOSS_TERMS,
                                FAMILY, OBJ, LOC, TASK_ID)

SMALL = dict(image_size=48, vision_channels=(8, 16, 16, 16), d_model=32, heads=2, keypoints=8, dropout=0.1)


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp('pt')/'data'
    SyntheticDataGenerator(DataConfig(root=str(root), num_episodes=12, image_size=48, seed=2)).generate_dataset(progress_bar=False)
    return EpisodeDataset(root)


def _mcfg(eds, **kw): return ModelConfig(**{**SMALL, **kw}, vocab_size=eds.tokenizer.vocab_size, max_tokens=eds.tokenizer.max_len)


def _trainer(eds, out, **kw):
    seed_everything(0)
    cfg = PretrainConfig(**{**dict(batch_size=16, warmup_steps=5, log_every=5, ckpt_every=1000, out_dir=str(out), tensorboard=False), **kw})
    return VLAPretrainer(VLANet(_mcfg(eds)), PretrainDataset(eds), cfg)


def test_config_validation():
    with pytest.raises(ValueError, match='grad_clip'): PretrainConfig(grad_clip=0)
    with pytest.raises(ValueError, match='alignment_weight'): PretrainConfig(alignment_weight=-1)
    assert PretrainConfig.from_dict(PretrainConfig(lr=3e-4).to_dict()) == PretrainConfig(lr=3e-4)


def test_dataset_targets_come_from_the_scene(data):
    ds = PretrainDataset(data)
    for k in range(len(data)):
        i = int(np.flatnonzero(ds.cols['episode'] == k)[0]); s, e = ds[i], data.episodes[k]
        assert int(s[FAMILY]) == sim.TASK_FAMILIES.index(e['task']['family'])
        names = [o['name'] for o in e['meta']['scene']['objects']]
        assert sorted(np.asarray(OBJECT_NAMES)[s[OBJ_MASK].numpy()]) == sorted(names)
        j = names.index(names[0]); xy = e['meta']['scene']['objects'][j]['xy']
        np.testing.assert_allclose(s[OBJ_XY][OBJECT_NAMES.index(names[0])].numpy() * 0.15 + (0.55, 0.0), xy[:2], atol=1e-5)
        grip = data.load_episode(k)[ACTION][:, 6]
        if e['task']['obj'] and (grip > 0).any():                      # the grasped object is masked from the first close on
            c = int(np.flatnonzero(grip > 0)[0]); j = OBJECT_NAMES.index(e['task']['obj'])
            assert ds[i + c - 1][OBJ_MASK][j] and not ds[i + c][OBJ_MASK][j]


def test_schedule_warmup_then_cosine():
    assert warmup_cosine(0, 100, 10) == pytest.approx(0.1) and warmup_cosine(9, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 10) == pytest.approx(0.5) and warmup_cosine(100, 100, 10, 0.1) == pytest.approx(0.1)
    vals = [warmup_cosine(s, 100, 10) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


def test_alignment_is_contrastive_not_collapsible():
    B = 8; one = torch.ones(B, 16)
    assert alignment_loss(one, one).item() == pytest.approx(math.log(B), abs=1e-5)        # collapse = chance
    z = torch.randn(B, 16)
    assert alignment_loss(z, z, logit_scale=torch.tensor(math.log(100))).item() < 0.05   # matched pairs -> ~0
    lab = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]); zz = torch.nn.functional.one_hot(lab, 4).float()
    assert alignment_loss(zz, zz, lab, torch.tensor(math.log(100))).item() == pytest.approx(math.log(2), abs=1e-3)   # same-command = positives


def test_vision_and_language_losses_on_known_values():
    xy = torch.zeros(2, 3, 2); mask = torch.tensor([[True, False, False], [True, True, False]])
    pred = torch.ones(2, 3, 2); pred[0, 1] = 100                   # a masked (absent) object's error does not count
    assert vision_loss(pred, xy, mask).item() == pytest.approx(1.0)
    logits = {k: torch.tensor([[0., 50.], [50., 0.]]) for k in (FAMILY, OBJ, LOC)}
    lab = {k: torch.tensor([1, 0]) for k in (FAMILY, OBJ, LOC)}
    assert language_loss(logits, lab).item() < 1e-6


def test_each_loss_term_is_real_and_learns(data, tmp_path):
    tr = _trainer(data, tmp_path, lr=2e-3)
    terms = tr.module(random_batch(tr.model.cfg, 8))
    heads = tr.module.heads
    for k, part in (('vision_loss', heads.vision), ('language_loss', heads.family), ('alignment_loss', heads.img_proj), ('action_loss', tr.model.head)):
        g = torch.autograd.grad(terms[k], list(part.parameters()), allow_unused=True)
        assert any(x is not None and x.abs().sum() > 0 for x in g), k
    h = tr.pretrain(12)                                             # ~ 17 steps/epoch at B=16
    first, last = ({k: float(np.mean(h[k][s])) for k in LOSS_TERMS} for s in (slice(0, 5), slice(-15, None)))
    assert last['alignment_loss'] < math.log(16) - 0.5, last        # well below chance log(B)
    assert last['language_loss'] < 0.3 * first['language_loss'], (first, last)
    assert last['vision_loss'] < 0.7 * first['vision_loss'], (first, last)
    assert last['action_loss'] < first['action_loss'], (first, last)
    assert len(h['total_loss']) == tr.step and h['learning_rate'][-1] < h['learning_rate'][20]


def test_nan_is_detected_and_named(data, tmp_path):
    tr = _trainer(data, tmp_path)
    b = random_batch(tr.model.cfg, 4); b[IMAGE][0, 0, 0, 0] = float('nan')
    with pytest.raises(FloatingPointError, match=r"non-finite values in batch \['image'\] at step 0"): tr.pretrain_step(b)
    b = random_batch(tr.model.cfg, 4); b[OBJ_XY][:] = 1e30                  # finite input, overflowing loss
    with pytest.raises(FloatingPointError, match=r'non-finite loss at step 0.*vision_loss=(inf|nan)') as e: tr.pretrain_step(b)
    assert 'language_loss' not in str(e.value) and tr.step == 0            # nothing was applied


def test_resume_reproduces_the_straight_run(data, tmp_path):
    straight = _trainer(data, tmp_path/'a'); straight.pretrain(2)
    n = straight.step
    first = _trainer(data, tmp_path/'b'); first.pretrain(2, max_steps=n // 2 + 3)   # stop mid-epoch
    assert first.pos != 0 and first.step == n // 2 + 3
    resumed = VLAPretrainer(VLANet(_mcfg(data)), PretrainDataset(data), first.config, resume=True)
    assert (resumed.step, resumed.epoch, resumed.pos) == (first.step, first.epoch, first.pos)
    resumed.pretrain(2)
    assert resumed.step == n
    for (k, a), b in zip(straight.module.state_dict().items(), resumed.module.state_dict().values()): assert torch.equal(a, b), k
    assert resumed.metrics['total_loss'] == pytest.approx(straight.metrics['total_loss'], abs=0)
    assert resumed.metrics['learning_rate'] == straight.metrics['learning_rate']


def test_checkpoint_is_safetensors_with_optimizer_state(data, tmp_path):
    tr = _trainer(data, tmp_path); tr.pretrain(1, max_steps=3)
    tensors, meta = load_checkpoint(tmp_path/'checkpoint.safetensors')
    assert meta['step'] == 3 and meta['kind'] == 'vla_nb.VLAPretrainer' and len(meta['metrics']['total_loss']) == 3
    assert any(k.startswith('optim.') and k.endswith('exp_avg_sq') for k in tensors) and any(k.startswith('heads.') for k in tensors)
    net = load_weights(VLANet(_mcfg(data)), {k[4:]: v for k, v in tensors.items() if k.startswith('net.')})   # plain VLANet layout
    assert torch.equal(net.state_dict()['head.mlp.0.weight'], tr.model.state_dict()['head.mlp.0.weight'])


def test_epoch_shards_are_disjoint_and_seeded():
    a, b = epoch_indices(11, 2, 5, 0, 2), epoch_indices(11, 2, 5, 1, 2)
    assert len(a) == len(b) == 6 and set(range(11)) == set(a) | set(b)
    assert epoch_indices(11, 2, 5, 0, 2) == a and epoch_indices(11, 3, 5, 0, 2) != a


SCRIPT = '''
import hashlib, json, sys, torch
from vla_nb.pretraining import run_pretrain, epoch_indices
tr = run_pretrain(sys.argv[1:-1])
shard = epoch_indices(len(tr.dataset), 0, tr.config.seed, tr.rank, tr.world)
h = hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for p in tr.module.parameters())).hexdigest()
with open(f"{sys.argv[-1]}/rank{tr.rank}.json", "w") as f:
    json.dump(dict(rank=tr.rank, world=tr.world, hash=h, shard=shard, written=[str(p) for p in tr.written], step=tr.step), f)
'''


def test_torchrun_two_processes(data, tmp_path):
    script = tmp_path/'run.py'; script.write_text(SCRIPT)
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]
    out, dump = tmp_path/'out', tmp_path/'dump'; dump.mkdir()
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_addr=127.0.0.1', f'--master_port={port}', str(script),
           '--data', str(data.root), '--out', str(out), '--epochs', '1', '--max-steps', '4', '--batch-size', '8', '--log-every', '2', '--device', 'cpu', str(dump)]
    env = {**os.environ, 'VLA_NO_PROGRESS': '1', 'OMP_NUM_THREADS': '1'}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    ranks = [json.loads((dump/f'rank{i}.json').read_text()) for i in (0, 1)]
    assert [x['world'] for x in ranks] == [2, 2] and [x['step'] for x in ranks] == [4, 4]
    assert ranks[0]['hash'] == ranks[1]['hash']                     # identical parameters after 4 steps
    a, b, N = set(ranks[0]['shard']), set(ranks[1]['shard']), data.num_frames
    assert a | b == set(range(N)) and len(a & b) <= N % 2          # disjoint shards (one padded repeat when N is odd)
    assert ranks[0]['written'] and ranks[1]['written'] == []        # only rank 0 writes
    assert sorted(p.name for p in out.iterdir() if p.name != 'tb') == ['checkpoint.json', 'checkpoint.safetensors', 'metrics.jsonl']
    assert len((out/'metrics.jsonl').read_text().splitlines()) == 2
    assert len(list((out/'tb').glob('events.out.tfevents.*'))) == 1          # TensorBoard events, from rank 0 only



def test_bench_train_reports_throughput():
    r = bench_train(batch_size=4, steps=1, model_config=ModelConfig(**SMALL))
    for k in ('train_samples_per_s', 'gflops_per_sample', 'achieved_gflops_per_s', 'matmul_peak_gflops_per_s'): assert r[k] > 0, (k, r)
    assert r['achieved_gflops_per_s'] < 1.5 * r['matmul_peak_gflops_per_s']


def test_vla_bench_train_reports_peak_rss(monkeypatch, tmp_path, capsys):
    "`vla-bench train` writes and prints peak_rss_mb, the process's peak resident memory (never below what it holds now)."
    import functools, vla_nb.pretraining as pt
    from vla_nb.cli import bench_main
    small = functools.partial(pt.bench_train, batch_size=2, steps=1, model_config=ModelConfig(**SMALL))
    monkeypatch.setattr(pt, 'bench_train', small)                        # the CLI looks it up at call time
    assert bench_main(['train', '--out', str(tmp_path/'train.json')]) == 0
    rss_mb = int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS:')).split()[1]) / 1024
    r = json.loads((tmp_path/'train.json').read_text())
    assert rss_mb * 0.99 <= r['peak_rss_mb'] < 64_000, (rss_mb, r['peak_rss_mb'])   # MiB, not KiB or bytes
    assert json.loads(capsys.readouterr().out)['peak_rss_mb'] == r['peak_rss_mb']
