"Contracts of the imitation chapter (vla_nb.imitation): batches, learning, early stopping, exact resume, DAgger, torchrun."
import json, os, socket, subprocess, sys
import numpy as np
import pytest
import torch
from vla_nb import sim
from vla_nb.core import seed_everything, load_checkpoint, derive_seed
from vla_nb.data import (SyntheticDataGenerator, DataConfig, EpisodeDataset, ChunkDataset, plan_episodes, ACTION, ACTION_PAD,
                         IMAGE, PROPRIO, TOKENS, OBJ_XY, OBJ_MASK, OBJECT_NAMES, scene_targets)
from vla_nb.model import ModelConfig, VLANet, VLAPolicy
from vla_nb.pretraining import VLAPretrainer, PretrainDataset, PretrainConfig
from vla_nb.imitation import (ImitationConfig, VLAImitationLearner, init_from_checkpoint, dagger_rollouts, run_imitation,
                              run_dagger, masked_mse, BCObjective, render_snapshots)

SMALL = dict(image_size=48, vision_channels=(8, 16, 16, 16), d_model=32, heads=2, keypoints=8)


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp('im')/'data'
    SyntheticDataGenerator(DataConfig(root=str(root), num_episodes=16, image_size=48, seed=3)).generate_dataset(progress_bar=False)
    return EpisodeDataset(root)


def _net(ds, **kw):
    seed_everything(0); return VLANet(ModelConfig(**{**SMALL, **kw}, vocab_size=ds.tokenizer.vocab_size, max_tokens=ds.tokenizer.max_len))


def _learner(ds, out, **kw):
    cfg = ImitationConfig(**{**dict(out_dir=str(out), batch_size=32, eval_every=0, eval_episodes=1, warmup_steps=5, log_every=5), **kw})
    return VLAImitationLearner(_net(ds), ds, cfg)


def test_config_validation():
    with pytest.raises(ValueError, match='val_frac'): ImitationConfig(val_frac=0.9)
    with pytest.raises(ValueError, match='aux_weight'): ImitationConfig(aux_weight=-1)


def test_batches_match_the_reference_dataset(data):
    cd = ChunkDataset(data, chunk_size=8)
    for i in (0, len(cd) - 1, len(cd) // 2):
        b, ref = cd.batch([i]), cd[i]
        for k in (IMAGE, PROPRIO, ACTION, ACTION_PAD, TOKENS): assert torch.allclose(b[k][0].float(), ref[k].float(), atol=1e-5), k
    all_ = cd.batch(np.arange(len(cd)), augment=False); m, t = all_[OBJ_MASK], all_[OBJ_XY]
    assert m.shape == (len(cd), len(OBJECT_NAMES)) and t.shape == (len(cd), len(OBJECT_NAMES), 2)
    acts = data.frames()[ACTION]
    for k, e in enumerate(data.episodes):                     # every object of the scene; the commanded one until the first close
        rows = torch.from_numpy(cd.cols['episode'] == k); scene = e['meta']['scene']
        xy0, m0 = scene_targets(scene)
        assert int(m0.sum()) == len(scene['objects'])
        assert torch.allclose(t[rows], torch.from_numpy(xy0).expand(int(rows.sum()), -1, -1))
        for o in scene['objects']:
            j = OBJECT_NAMES.index(o['name']); seen = int(m[rows, j].sum())
            if o['name'] == e['task'].get('obj'):
                s0 = int(data.starts[k]); closes = np.flatnonzero(acts[s0:s0 + e['length'], 6] > 0)
                assert seen == (int(closes[0]) if len(closes) else int(rows.sum()))
            else: assert seen == int(rows.sum())


def test_snapshots_are_seeded_and_labelled():
    a, b, c = render_snapshots(3, seed=0, image_size=48), render_snapshots(3, seed=0, image_size=48), render_snapshots(3, seed=1, image_size=48)
    assert a[IMAGE].shape == (3, 3, 48, 48) and a[IMAGE].dtype == torch.uint8
    for k in a: assert torch.equal(a[k], b[k])
    assert not torch.equal(a[OBJ_XY], c[OBJ_XY])
    assert a[OBJ_MASK].any(1).all() and a[OBJ_XY].shape == (3, len(OBJECT_NAMES), 2)
    env = sim.TabletopEnv(image_size=48)                      # the label is where the scene put the object
    env.reset(seed=int(np.random.default_rng(derive_seed(0, 'snapshots')).integers(0, 2**30, 3)[0]) + 2**30)
    assert torch.allclose(a[OBJ_XY][0], torch.from_numpy(scene_targets(env.world.scene)[0]))


def test_keypoint_loss(data):
    with pytest.raises(ValueError, match='keypoints'): BCObjective(_net(data, keypoints=4), 1.0)
    cd = ChunkDataset(data, chunk_size=8); batch = cd.batch(np.arange(16))
    snaps = render_snapshots(4, seed=0, image_size=48)
    plain, co = BCObjective(_net(data), 1.0), BCObjective(_net(data), 1.0, snaps, cd.norm, 8)
    co.aux.load_state_dict(plain.aux.state_dict())
    plain.eval(); co.eval()
    total = lambda terms: sum(terms.values())
    assert torch.allclose(total(plain(batch)), total(co(batch)))           # eval: no snapshot term
    plain.train(); co.train(); torch.manual_seed(0); lp = plain(batch); torch.manual_seed(0); lc = co(batch)
    assert lc['keypoint_loss'] > lp['keypoint_loss'] > 0     # training: a positive snapshot localization term
    assert set(BCObjective(_net(data), 0.0, snaps, cd.norm)(batch)) == {'action_loss', 'confidence_loss'}   # aux_weight 0


def test_learning_reduces_validation_loss_and_selects_by_success(data, tmp_path):
    learner = _learner(data, tmp_path, eval_every=2)
    before = learner.keypoint_rmse('train')
    learner.train_imitation(4); h = learner.history
    assert h['val_loss'][-1] < h['val_loss'][0] and len(h['success']) == 2
    assert learner.keypoint_rmse('train') < before                 # the keypoint loss localizes the objects
    assert learner.best_path.exists() and learner.best_success == max(h['success'])
    pol = VLAPolicy.load(learner.best_path)
    assert pol.tokenizer == data.tokenizer and pol.norm.stats() == learner.norm.stats()   # what the policy reads and outputs
    final = all(torch.equal(v, learner.model.state_dict()[k]) for k, v in pol.net.state_dict().items())
    assert final == (h['success'][-1] == max(h['success']))          # the best epoch's weights (ties: the later ones)
    if final:
        obs, _ = sim.TabletopEnv(image_size=48).reset(seed=1)
        np.testing.assert_array_equal(pol.predict_action_chunk(obs), learner.policy().predict_action_chunk(obs))


def test_early_stopping_uses_validation_loss_only(data, tmp_path):
    learner = _learner(data, tmp_path, patience=2, min_delta=1.0)
    learner.train_imitation(10)
    assert learner.stopped and learner.epoch == 3                       # epoch 1 sets the best, epochs 2 and 3 do not beat it by 1.0


def test_killed_run_resumes_exactly(data, tmp_path):
    a = _learner(data, tmp_path/'a'); a.train_imitation(3, max_steps=5)
    b = VLAImitationLearner(_net(data), data, a.config, resume=True); b.train_imitation(3)
    c = _learner(data, tmp_path/'c'); c.train_imitation(3)
    for k, v in c.model.state_dict().items(): assert torch.allclose(b.model.state_dict()[k], v, atol=1e-6), k
    assert b.history['train_loss'] == c.history['train_loss']
    t, meta = load_checkpoint(tmp_path/'a'/'checkpoint.safetensors')
    assert meta['kind'] == 'vla_nb.VLAImitationLearner' and any(k.startswith('optim.') for k in t)


def test_non_finite_loss_is_named(data, tmp_path):
    learner = _learner(data, tmp_path)
    b = learner.train_data.batch(np.arange(4)); b[IMAGE][:] = float('nan')
    with pytest.raises(FloatingPointError, match=r"non-finite values in batch \['image'\]"): learner.train_step(b)


def test_starts_from_a_pretrained_checkpoint(data, tmp_path):
    net = _net(data); pt = VLAPretrainer(net, PretrainDataset(data), PretrainConfig(out_dir=str(tmp_path), tensorboard=False, batch_size=16))
    pt.pretrain(1, max_steps=2)
    fresh = init_from_checkpoint(_net(data), pt.ckpt_path)
    for k, v in net.state_dict().items(): assert torch.equal(fresh.state_dict()[k], v)
    with pytest.raises(ValueError, match='does not match'): init_from_checkpoint(_net(data, d_model=16), pt.ckpt_path)


def test_dagger_labels_visited_states_with_the_expert(data, tmp_path):
    learner = _learner(data, tmp_path); learner.train_imitation(1)
    env = sim.TabletopEnv(image_size=48)
    rep = dagger_rollouts(learner.policy(), tmp_path/'dag', 3, seed=11, beta=0.0, data_config=DataConfig(image_size=48), env=env)
    ds = EpisodeDataset(tmp_path/'dag'); ep = ds.load_episode(0)
    assert rep['episodes'] == 3 and len(ep[ACTION]) == ds.episodes[0]['length']
    obs, _ = env.reset(seed=ds.episodes[0]['meta']['seed'], options=dict(command=ds.episodes[0]['command']))
    assert np.array_equal(obs['image'], ep[IMAGE][0])                                       # the recorded scene
    assert np.allclose(sim.ScriptedExpert(env).select_action(obs), ep[ACTION][0], atol=1e-6)   # the label is the expert's action there
    n = len(learner.train_data); learner.add_data(ds); assert len(learner.train_data) == n + ds.num_frames


SCRIPT = '''
import json, sys, torch
from vla_nb.imitation import run_imitation
learner = run_imitation(sys.argv[1:-1])
h = float(sum(p.double().sum() for p in learner.model.parameters()))
json.dump(dict(world=learner.world, step=learner.step, hash=h), open(f"{sys.argv[-1]}/rank{learner.rank}.json", 'w'))
'''


@pytest.mark.slow
def test_torchrun_two_processes(data, tmp_path):
    script = tmp_path/'run.py'; script.write_text(SCRIPT)
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]
    out, dump = tmp_path/'out', tmp_path/'dump'; dump.mkdir()
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_addr=127.0.0.1', f'--master_port={port}', str(script),
           '--data', str(data.root), '--out', str(out), '--epochs', '1', '--max-steps', '3', '--batch-size', '8', '--device', 'cpu',
           '--eval-every', '0', '--snapshots', '4', '--keypoint-level', '1', str(dump)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env={**os.environ, 'VLA_NO_PROGRESS': '1', 'OMP_NUM_THREADS': '1'})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    ranks = [json.loads((dump/f'rank{i}.json').read_text()) for i in (0, 1)]
    assert [x['world'] for x in ranks] == [2, 2] and [x['step'] for x in ranks] == [3, 3]
    assert ranks[0]['hash'] == ranks[1]['hash']                  # identical parameters: gradients were averaged
    assert (out/'checkpoint.safetensors').exists()


def test_masked_mse_counts_known_objects_only():
    pred, target = torch.zeros(2, 3, 2), torch.ones(2, 3, 2)
    target[0, 1] = 100.                                               # an unknown object's error does not count
    mask = torch.tensor([[True, False, True], [False, False, True]])
    assert masked_mse(pred, target, mask).item() == pytest.approx(1.0)
    pred[1, 2] = torch.tensor([1., 3.])                                # errors 0 and 4 -> squares 0 and 16
    assert masked_mse(pred, target, mask).item() == pytest.approx((1 + 1 + 1 + 1 + 0 + 4) / 6)
    assert masked_mse(pred, target, torch.zeros(2, 3, dtype=torch.bool)).item() == 0   # nothing known: 0, not NaN
    p = torch.zeros(2, 3, 2, requires_grad=True); masked_mse(p, target, mask).backward()
    assert (p.grad[~mask] == 0).all() and (p.grad[mask] != 0).all()   # no gradient towards unknown positions


def test_run_dagger_aggregates_relabelled_rounds(tiny_data, tmp_path, monkeypatch):
    import vla_nb.imitation as I
    from vla_nb.evaluation import env_for
    monkeypatch.setattr(I, 'env_for', lambda policy, **kw: env_for(policy, max_steps=15, **kw))   # short on-policy episodes
    cfg = ImitationConfig(out_dir=str(tmp_path/'il'), batch_size=16, eval_every=0, eval_episodes=1, warmup_steps=1, val_frac=0.2)
    learner = VLAImitationLearner(_net(tiny_data), tiny_data, cfg)
    learner.train_imitation(1, max_steps=2)
    n0, e0 = len(learner.train_data), learner.epoch
    with pytest.raises(ValueError, match='rounds'): run_dagger(learner, 0, 1, 1, tmp_path/'dag')
    out = run_dagger(learner, rounds=2, episodes_per_round=1, epochs_per_round=1, root=tmp_path/'dag', beta=0.5, test_episodes=0, seed=4)
    assert [r['round'] for r in out] == [0, 1, 2] and out[0] == dict(round=0, frames=n0, policy_success=None, success=None)
    for r in (1, 2):                                                  # each round: one on-policy episode under its own seed
        ds = EpisodeDataset(tmp_path/'dag'/f'round{r}')
        e = ds.episodes[0]
        assert len(ds) == 1 and out[r]['frames'] == out[r - 1]['frames'] + e['length'] and e['length'] <= 15
        assert e['meta']['beta'] == 0.5 * 0.5 ** (r - 1)              # the expert's share halves each round
        assert e['meta']['seed'] == plan_episodes(DataConfig(num_episodes=1, seed=derive_seed(4, 'dagger', r)))[0]['seed']
        assert out[r]['policy_success'] == float(e['meta']['policy_success']) and ds.tokenizer == tiny_data.tokenizer
    assert learner.extra_roots == [str(tmp_path/'dag'/'round1'), str(tmp_path/'dag'/'round2')]
    assert learner.epoch == e0 + 2 and len(learner.train_data) == out[2]['frames']   # it trained on the aggregate
