"Each monitor of the best-practices chapter catches a reproduced failure and stays quiet on the healthy case."
import logging

import numpy as np
import pytest
import torch

from vla_nb import sim
from vla_nb.data import (ACTION, IMAGE, PROPRIO, WRIST_IMAGE, ChunkDataset, DataConfig, EpisodeDataset, EpisodeWriter,
                         Normalizer, SyntheticDataGenerator, compute_stats)
from vla_nb.evaluation import env_for
from vla_nb.language import CommandTokenizer
from vla_nb.model import ModelConfig, VLANet, VLAPolicy, bounds_stats, load_pretrained, vla_loss
from vla_nb.imitation import VLAImitationLearner
from vla_nb.practices import (CurriculumLearner, DataChecker, DriftMonitor, OutputMonitor, ResourceMonitor,
                              StreamRateMonitor, TrainingMonitor, Watch, feature_stats, longest_run, token_agreement)
from vla_nb.pretraining import PretrainConfig, VLAPretrainer, random_batch

logging.getLogger('vla_nb.practices').setLevel(logging.ERROR)
SMALL = ModelConfig(image_size=48, vision_channels=(8, 16, 16, 16), d_model=32, heads=2, keypoints=8, text_layers=1)


def _pretrain(lr, tmp_path, steps=12):
    torch.manual_seed(0)
    cfg = PretrainConfig(lr=lr, warmup_steps=10, batch_size=16, out_dir=str(tmp_path / f'p{lr}'), tensorboard=False)
    tr = VLAPretrainer(VLANet(SMALL), None, cfg)
    tr.total_steps = 100
    mon = TrainingMonitor().attach(tr)
    for i in range(steps):
        tr.pretrain_step(random_batch(SMALL, 16, seed=i))
    return mon.detach(), tr


def test_training_monitor_catches_lr_spike_not_healthy(tmp_path):
    ok, _ = _pretrain(1e-3, tmp_path)
    bad, _ = _pretrain(1.0, tmp_path)
    assert ok.alerts == []
    assert 'grad_spike' in bad.kinds() or 'loss_spike' in bad.kinds()
    assert len(ok.history('grad/net.vision')[1]) == 12  # per-part norms were recorded every step


def test_training_monitor_nan_batch_and_detach(tmp_path):
    mon, tr = _pretrain(1e-3, tmp_path, steps=1)
    mon.attach(tr)
    b = random_batch(SMALL, 16)
    b[PROPRIO][0, 0] = float('nan')
    with pytest.raises(FloatingPointError):
        tr.pretrain_step(b)
    assert mon.kinds() == ['nan']
    mon.detach()
    assert 'update' not in vars(tr)  # the trainer has its own methods back


def test_overfitting_alert():
    mon = TrainingMonitor(patience=2)
    for e, (tr, va) in enumerate([(1.0, 0.9), (0.8, 0.85), (0.6, 0.86), (0.4, 0.9)]):
        mon.observe_epoch(e, tr, va)
    assert mon.kinds() == ['overfitting'] and mon.alerts[0]['best_epoch'] == 1
    quiet = TrainingMonitor(patience=2)
    for e, (tr, va) in enumerate([(1.0, 0.9), (0.8, 0.85), (0.6, 0.8), (0.5, 0.81)]):
        quiet.observe_epoch(e, tr, va)
    assert quiet.alerts == []


def test_data_checker_balance_frames_drift(tiny_data, tmp_path):
    chk = DataChecker()
    chk.balance(tiny_data)
    chk.frames(tiny_data)
    assert chk.alerts == []
    w = EpisodeWriter(tmp_path / 'bad')
    for i, k in enumerate([0, 1, 0, 1, 0, 1, 0, 1]):  # a duplicated recording of two pick/move episodes, one frozen
        ep = tiny_data.load_episode(k)
        if i == 1:
            ep[IMAGE][1:5] = ep[IMAGE][1]
        task = dict(tiny_data.episodes[k]['task'])
        w.add_episode(i, ep, tiny_data.episodes[k]['command'], task, tiny_data.episodes[k]['meta'])
    bad = w.finalize()
    chk = DataChecker()
    chk.balance(bad)
    r = chk.frames(bad)
    assert r['runs'][1] == (4, 1)
    assert chk.kinds() == ['imbalance', 'frozen_frames', 'duplicate_frames']
    assert chk.drift(tiny_data.stats, tiny_data.stats)[ACTION][0] == 0
    assert longest_run(np.array([1, 1, 2, 2, 2, 3])) == (3, 2)


def test_dead_action_dim_and_drift(tiny_data):
    st = compute_stats(tiny_data)
    moved = {k: dict(v) for k, v in st.items()}
    moved[ACTION] = dict(st[ACTION], mean=st[ACTION]['mean'] + 2 * st[ACTION]['std'])
    chk = DataChecker()
    assert chk.drift(st, moved)[ACTION][0] == pytest.approx(2.0, abs=1e-6)
    assert chk.kinds() == ['stats_drift']


def test_resource_monitor_catches_graph_leak(tiny_data):
    net = VLANet(ModelConfig(image_size=48, vision_channels=(16, 32, 64, 64), d_model=64, keypoints=8)).eval()
    data = ChunkDataset(tiny_data, chunk_size=net.cfg.chunk_size)

    def run(buggy):
        res, total = ResourceMonitor(max_growth_mb=40), 0.0
        with res, torch.set_grad_enabled(buggy):
            for i in range(8):
                loss, _ = vla_loss(net, data.batch(np.arange(i * 32, (i + 1) * 32) % len(data)))
                total = total + (loss if buggy else float(loss))
                res.tick(32)
        return res

    run(False)
    ok, leak = run(False), run(True)
    assert ok.alerts == [] and ok.report()['items_per_s'] > 0
    assert leak.kinds() == ['memory_growth']


def test_stream_rate_monitor():
    ok, bad = StreamRateMonitor(min_rate={'/cam': 28}), StreamRateMonitor(min_rate={'/cam': 28})
    for k in range(300):
        t = k * 10**9 // 30
        ok.tick('/cam', t)
        if not 60 <= k < 90:
            bad.tick('/cam', t)
    r = ok.report()['/cam']
    assert r['rate_hz'] == pytest.approx(30, abs=0.01) and r['gaps'] == 0 and ok.alerts == []
    r = bad.report()['/cam']
    assert r['gaps'] == 1 and r['max_ms'] == pytest.approx(1033.3, abs=0.1)
    assert bad.kinds() == ['stream_gap', 'low_rate']


def test_stream_rate_monitor_from_bag(tmp_path):
    from vla_nb.ros import image_msg, write_bag

    img = np.zeros((8, 8, 3), np.uint8)
    recs = [('/camera/image_raw', k * 10**8, image_msg(img, k * 10**8)) for k in range(20) if k not in (10, 11, 12)]
    mon = StreamRateMonitor.from_bag(write_bag(tmp_path / 'bag', recs))
    assert mon.report()['/camera/image_raw']['n'] == 17 and mon.kinds() == ['stream_gap']


@pytest.fixture(scope='module')
def shipped():
    return load_pretrained('tabletop-words')


def _episode(pol, monitors, env, seed=0):
    w = Watch(pol, *monitors)
    sim.rollout(env, w, seed)
    return monitors


def test_output_monitor_wrong_stats(shipped):
    env = env_for(shipped, max_steps=40)
    try:
        ok = _episode(shipped, [OutputMonitor(shipped.norm.stats())], env)[0]
        wrong = VLAPolicy(shipped.net, Normalizer(bounds_stats()), shipped.tokenizer)
        bad = _episode(wrong, [OutputMonitor(shipped.norm.stats())], env)[0]
    finally:
        env.close()
    assert ok.kinds() == [] and bad.kinds() == ['chunk_disagreement']
    assert bad.peak['chunk_disagreement'] > ok.peak['chunk_disagreement']


def test_drift_monitor_dead_wrist_camera(tmp_path):
    root = tmp_path / 'w'
    SyntheticDataGenerator(DataConfig(root=str(root), num_episodes=4, image_size=48, wrist_camera=True, wrist_size=32,
                                      seed=3)).generate_dataset(progress_bar=False)
    ref = feature_stats(EpisodeDataset(root))
    env = sim.TabletopEnv(sim.SimConfig(image_size=48, wrist_camera=True, wrist_size=32, max_steps=40))
    try:
        mons = {}
        for dead in (False, True):
            mons[dead] = m = DriftMonitor(ref, window=10)
            obs, _ = env.reset(seed=11)
            expert = sim.ScriptedExpert(env)
            for _ in range(30):
                if dead:
                    obs = {**obs, WRIST_IMAGE: np.zeros_like(obs[WRIST_IMAGE])}
                a = expert.select_action(obs)
                m.observe_step(obs, action=a)
                obs, _, term, trunc, _ = env.step(a)
                if term or trunc:
                    break
    finally:
        env.close()
    assert 'drift/wrist_image' not in mons[False].kinds()
    assert 'drift/wrist_image' in mons[True].kinds()


def test_token_agreement(shipped):
    from vla_nb.language import command_corpus

    corpus = command_corpus()
    assert token_agreement(shipped.tokenizer, shipped.tokenizer, corpus) == 1.0
    other = CommandTokenizer.build(sorted(corpus)[:40])  # the vocabulary of another dataset's commands
    assert token_agreement(shipped.tokenizer, other, corpus) < 1


def _curriculum(tiny_data, tmp_path, **kw):
    cfg = dict(batch_size=8, eval_every=0, snapshots=0, out_dir=str(tmp_path / kw.get('schedule', 'c')))
    return CurriculumLearner(VLANet(SMALL), tiny_data, cfg, **kw)


def test_easy_first_starts_on_short_episodes_and_widens(tiny_data, tmp_path):
    c = _curriculum(tiny_data, tmp_path, schedule='easy_first', start_frac=0.3, ramp=0.5)
    fam, length, _ = c.frame_table()
    n = len(length)
    c.total_steps = 100
    w0 = c.sample_weights(n)
    k = int(np.ceil(0.3 * n))
    assert np.count_nonzero(w0) == k  # only the pool of the 30% shortest frames
    assert length[w0 > 0].max() <= np.sort(length)[k - 1]
    assert length[c.epoch_batch(n)].max() <= np.sort(length)[k - 1]
    c.step = 25  # half-way up the ramp: 0.3 + 0.7 * 0.5 of the frames
    assert np.count_nonzero(c.sample_weights(n)) == int(np.ceil(0.65 * n))
    c.step = 50  # the ramp is over: uniform
    np.testing.assert_allclose(c.sample_weights(n), np.full(n, 1 / n))


def test_failures_schedule_oversamples_the_failing_family(tiny_data, tmp_path):
    c = _curriculum(tiny_data, tmp_path, schedule='failures', floor=0.25)
    fam = c.frame_table()[0]
    n = len(fam)
    np.testing.assert_allclose(c.sample_weights(n), np.full(n, 1 / n))  # no evaluation yet: uniform
    fail = fam[0]
    c.last_eval = {'success': {f: dict(k=0 if f == fail else 4, n=4) for f in sim.TASK_FAMILIES}}
    w = c.sample_weights(n)
    s = np.mean(fam == fail)
    assert w[fam == fail].sum() == pytest.approx(1.25 * s / (1.25 * s + 0.25 * (1 - s)))
    assert len(set(np.round(w[fam != fail], 12))) == 1  # every family that succeeds: the same small weight


def test_curriculum_batches_are_seeded_and_the_budget_is_uniforms(tiny_data, tmp_path):
    a = _curriculum(tiny_data, tmp_path / 'a', schedule='easy_first')
    b = _curriculum(tiny_data, tmp_path / 'b', schedule='easy_first')
    n = len(a.train_data)
    a.total_steps = b.total_steps = 10
    np.testing.assert_array_equal(a.epoch_batch(n), b.epoch_batch(n))  # the same (seed, step): the same batch
    a.step = 1
    assert not np.array_equal(a.epoch_batch(n), b.epoch_batch(n))
    u = VLAImitationLearner(VLANet(SMALL), tiny_data, dict(batch_size=8, eval_every=0, snapshots=0,
                                                           out_dir=str(tmp_path / 'u')))
    b.shares = []
    b.train_imitation(1, max_steps=3)
    u.train_imitation(1, max_steps=3)
    assert b.step == u.step == 3
    assert [s[0] for s in b.shares] == [0, 1, 2]


def test_curriculum_refuses_an_unknown_schedule(tiny_data, tmp_path):
    with pytest.raises(ValueError, match='easy_first'):
        _curriculum(tiny_data, tmp_path, schedule='hardest_first')


def test_curriculum_resumes_its_schedule_and_shares(tiny_data, tmp_path):
    c = _curriculum(tiny_data, tmp_path, schedule='failures')
    c.last_eval = {'success': {f: dict(k=1, n=2) for f in sim.TASK_FAMILIES}}
    c.train_imitation(1, max_steps=2)
    c.save_state()
    again = _curriculum(tiny_data, tmp_path, schedule='failures', resume=True)
    assert again.shares == c.shares and again.step == 2
    assert again.last_eval == c.last_eval  # what the failures schedule reads survives the restart
    with pytest.raises(ValueError, match="schedule='failures'"):
        _curriculum(tiny_data, tmp_path, schedule='easy_first', resume=c.ckpt_path)
