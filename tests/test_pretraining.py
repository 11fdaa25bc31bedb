"Contracts of the pretraining chapter (vla_nb.pretraining): real loss terms, schedule, NaN detection, exact resume, torchrun DDP."
import json, math, os, socket, subprocess, sys
from pathlib import Path
import numpy as np
import pytest
import torch
from vla_nb import sim
from vla_nb.core import seed_everything, load_checkpoint
from vla_nb.data import SyntheticDataGenerator, DataConfig, EpisodeDataset, IMAGE, ACTION, PROPRIO, OBJ_XY, OBJ_MASK, OBJECT_NAMES
from vla_nb.model import ModelConfig, VLANet, load_weights
from vla_nb.pretraining import (PretrainConfig, PretrainDataset, PretrainHeads, PretrainModel, VLAPretrainer, alignment_loss, vision_loss,
                                language_loss, warmup_cosine, epoch_indices, random_batch, bench_train, ridge_fit, linear_probe,
                                image_features, adamw, optimizer_tensors, restore_optimizer, LOSS_TERMS,
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
    tr.pretrain(12); h = tr.metrics                                 # ~ 17 steps/epoch at B=16
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
    assert r['batch_size'] == 4 and r['steps'] == 1 and r['train_samples_per_s'] == pytest.approx(4 / r['step_ms'] * 1000, rel=0.01)
    assert r['achieved_gflops_per_s'] == pytest.approx(r['gflops_per_sample'] * r['train_samples_per_s'], rel=0.02)


# ---- probes, resumable state ----

def test_ridge_fit_recovers_a_linear_map():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 6, generator=g) * torch.tensor([1., 10, 0.1, 1, 1, 5])   # unevenly scaled features
    W, b = torch.randn(6, 3, generator=g), torch.tensor([1., -2, 0.5])
    predict = ridge_fit(X, X @ W + b, lam=1e-9)
    Xn = torch.randn(50, 6, generator=g)
    torch.testing.assert_close(predict(Xn), Xn @ W + b, atol=1e-3, rtol=1e-3)
    shrunk = ridge_fit(X, X @ W + b, lam=10.0)(Xn)                          # a strong penalty shrinks towards the mean
    assert (shrunk - (X @ W + b).mean(0)).abs().mean() < (Xn @ W + b - (X @ W + b).mean(0)).abs().mean()


@pytest.fixture(scope='module')
def probe_sets(tiny_data):
    return PretrainDataset(tiny_data, [0, 1, 2, 3]), PretrainDataset(tiny_data, [4, 5])


def test_linear_probe_scores_a_known_answer(probe_sets, monkeypatch):
    "Features that are the targets score R² 1 and accuracy 1; features of pure noise score R² <= 0 on held-out frames."
    import vla_nb.pretraining as P
    train, val = probe_sets
    def oracle(net, ds, batch_size=256):                                   # the probe's targets, linearly readable
        b = ds.batch(np.arange(len(ds)), augment=False)
        return torch.cat([b[PROPRIO][:, :3], b[OBJ_XY].flatten(1), b[OBJ_MASK].float()], 1)
    monkeypatch.setattr(P, 'image_features', oracle)
    assert P.linear_probe(None, train, train, lam=1e-4) == dict(gripper_r2=1.0, object_xy_r2=1.0, presence_acc=1.0)
    r = P.linear_probe(None, train, val, lam=1e-4)                         # held-out frames: the gripper still reads exactly
    assert r['gripper_r2'] > 0.99 and r['object_xy_r2'] < r['gripper_r2'], r   # (val has objects train never showed)
    assert P.linear_probe(None, train, val, lam=100.0)['gripper_r2'] < r['gripper_r2']   # a strong penalty shrinks the fit
    noise = lambda net, ds, batch_size=256: torch.randn(len(ds), 64, generator=torch.Generator().manual_seed(len(ds)))
    monkeypatch.setattr(P, 'image_features', noise)
    r = P.linear_probe(None, train, val, lam=1.0)
    assert r['gripper_r2'] < 0.05 and r['object_xy_r2'] < 0.05, r


def test_linear_probe_on_real_features(probe_sets):
    train, val = probe_sets
    torch.manual_seed(0)
    net = VLANet(_mcfg(train))
    feats = image_features(net, val)
    assert feats.shape == (len(val), net.cfg.d_model) and torch.isfinite(feats).all()
    img = val.batch(np.arange(3), augment=False)[IMAGE]                    # frozen, command-free: the image alone decides
    torch.testing.assert_close(feats[:3], PretrainModel(net).eval().image_features(img), atol=1e-5, rtol=1e-5)
    r = linear_probe(net, train, val)
    assert set(r) == {'gripper_r2', 'object_xy_r2', 'presence_acc'} and all(np.isfinite(v) for v in r.values())
    assert r['gripper_r2'] <= 1 and r['object_xy_r2'] <= 1 and 0.5 <= r['presence_acc'] <= 1   # presence is mostly decidable
    assert linear_probe(net, train, val) == r                              # deterministic: no augmentation, eval mode


def test_load_state_refuses_a_changed_config(data, tmp_path):
    tr = _trainer(data, tmp_path); tr.pretrain(1, max_steps=2)
    cfg = tr.config
    for change, key in ((dict(lr=5e-4), 'lr'), (dict(batch_size=8), 'batch_size'), (dict(seed=1), 'seed'),
                        (dict(alignment_weight=0.5), 'alignment_weight')):
        with pytest.raises(ValueError, match=rf"resuming .* with a different config: \{{'{key}': .*start a new run instead"):
            VLAPretrainer(VLANet(_mcfg(data)), PretrainDataset(data), cfg.replace(**change), resume=True)
    ok = VLAPretrainer(VLANet(_mcfg(data)), PretrainDataset(data), cfg.replace(log_every=3, tensorboard=True, device='cpu'), resume=True)
    assert ok.step == 2 and ok.config.log_every == 3                       # logging and device may change on resume
    for (k, a), b in zip(tr.module.state_dict().items(), ok.module.state_dict().values()): assert torch.equal(a, b), k
    from vla_nb.imitation import ImitationConfig, VLAImitationLearner
    il = VLAImitationLearner(VLANet(_mcfg(data)), data, ImitationConfig(out_dir=str(tmp_path/'il'), batch_size=8, eval_every=0))
    il.save_state()
    with pytest.raises(ValueError, match=r"is not a vla_nb.VLAPretrainer checkpoint \(kind='vla_nb.VLAImitationLearner'\)"):
        tr.load_state(il.ckpt_path)
    with pytest.raises(FileNotFoundError): _trainer(data, tmp_path/'none').load_state(tmp_path/'none'/'checkpoint.safetensors')


def test_adamw_decays_weight_matrices_only_and_its_state_round_trips():
    torch.manual_seed(0)
    net = VLANet(ModelConfig(**{**SMALL, 'dropout': 0.0}))
    opt = adamw(net, 1e-3, 0.05)
    decay, rest = opt.param_groups
    assert decay['weight_decay'] == 0.05 and rest['weight_decay'] == 0.0
    assert all(p.ndim >= 2 for p in decay['params']) and all(p.ndim < 2 for p in rest['params'])
    assert len(decay['params']) + len(rest['params']) == len(list(net.parameters()))
    b = random_batch(net.cfg, 4)
    def step(o):
        o.zero_grad(); net(b[IMAGE], b['token_ids'], b['proprio'])[0].square().mean().backward(); o.step()
    step(opt); step(opt)
    tensors, groups = optimizer_tensors(opt)
    assert all(k.startswith('optim.') and torch.is_tensor(v) for k, v in tensors.items())
    json.dumps(groups)                                                       # JSON, not pickle
    tensors = {k: v.clone() for k, v in tensors.items()}                     # (live state: save_state writes them at once)
    snapshot = {k: v.clone() for k, v in net.state_dict().items()}
    step(opt); after = {k: v.clone() for k, v in net.state_dict().items()}  # the straight run's third step
    net.load_state_dict(snapshot)
    fresh = adamw(net, 1e-3, 0.05); restore_optimizer(fresh, {**tensors, 'net.x': torch.ones(1)}, groups)
    step(fresh)                                                              # the restored run's third step
    for k, v in net.state_dict().items(): assert torch.equal(v, after[k]), k


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
