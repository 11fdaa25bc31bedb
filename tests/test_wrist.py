"The optional wrist camera through the whole chain: sim -> dataset -> model -> policy -> imitation -> export -> runtime."
import numpy as np
import pytest
import torch
from vla_nb import sim
from vla_nb.core import seed_everything
from vla_nb.language import CommandTokenizer, command_corpus
from vla_nb.data import DataConfig, SyntheticDataGenerator, EpisodeDataset, ChunkDataset, Normalizer, IMAGE, WRIST_IMAGE, PROPRIO
from vla_nb.model import ModelConfig, VLANet, VLAPolicy, bounds_stats, check_inputs, vla_loss
from vla_nb.evaluation import env_for
from vla_nb.language import make_token_env
from vla_nb.imitation import VLAImitationLearner, ImitationConfig, dagger_rollouts
from vla_nb.deployment import (export_artifact, DeployConfig, OptimizedVLAInference, calibration_observations, parity, export_torchscript,
                               export_onnx, ort_session, input_names)

W = 32
SMALL = dict(image_size=48, vision_channels=(8, 16, 16, 16), d_model=32, heads=2, keypoints=8, dropout=0.)


@pytest.fixture(scope='module')
def wrist_data(tmp_path_factory):
    root = tmp_path_factory.mktemp('wrist')/'data'
    SyntheticDataGenerator(DataConfig(root=str(root), num_episodes=6, image_size=48, wrist_camera=True, wrist_size=W, seed=3)).generate_dataset(progress_bar=False)
    return EpisodeDataset(root)


@pytest.fixture(scope='module')
def policy():
    tok = CommandTokenizer.build(command_corpus()); seed_everything(0)
    return VLAPolicy(VLANet(ModelConfig(vocab_size=tok.vocab_size, wrist_size=W, **SMALL)), Normalizer(bounds_stats()), tok)


def test_sim_wrist_size():
    env = sim.TabletopEnv(image_size=48, wrist_camera=True, wrist_size=W); o, _ = env.reset(seed=1)
    assert o['wrist_image'].shape == (W, W, 3) and env.observation_space['wrist_image'].shape == (W, W, 3) and o['image'].shape == (48, 48, 3)
    o2, *_ = env.step(np.array([0, 0, -1, 0, 0, 0, 0], np.float32)); env.close()
    assert np.abs(o2['wrist_image'].astype(int) - o['wrist_image']).mean() > 1      # the camera rides on the hand
    with pytest.raises(ValueError, match='wrist_size'): sim.SimConfig(wrist_size=4)


def test_dataset_and_batches_carry_the_wrist_image(wrist_data):
    assert WRIST_IMAGE in wrist_data.stats and wrist_data.load_episode(0)[WRIST_IMAGE].shape[1:] == (W, W, 3)
    cd = ChunkDataset(wrist_data, chunk_size=4)
    s = cd[0]; assert s[WRIST_IMAGE].shape == (3, W, W) and s[IMAGE].shape == (3, 48, 48)
    raw = torch.from_numpy(np.array(wrist_data.frames()[WRIST_IMAGE][int(cd.cols['row'][0])])).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(s[WRIST_IMAGE], cd.norm.normalize(WRIST_IMAGE, raw))   # the wrist frame, under its own statistics
    assert not torch.allclose(cd.norm.normalize(WRIST_IMAGE, raw), cd.norm.normalize(IMAGE, raw))
    b = cd.batch(np.arange(5), torch.Generator().manual_seed(0), augment=True)
    assert b[WRIST_IMAGE].shape == (5, 3, W, W) and torch.isfinite(b[WRIST_IMAGE]).all()
    m = b[WRIST_IMAGE].mean((0, 2, 3)); assert m.abs().max() < 3                   # normalized with the wrist camera's own stats


def test_model_reads_the_wrist_camera(policy):
    net, cfg = policy.net, policy.cfg
    img, ids, pro = torch.randn(2, 3, 48, 48), torch.ones(2, 16, dtype=torch.long), torch.randn(2, 15)
    w1, w2 = torch.randn(2, 3, W, W), torch.randn(2, 3, W, W)
    with torch.no_grad(): a1, a2 = net(img, ids, pro, w1)[0], net(img, ids, pro, w2)[0]
    assert (a1 - a2).abs().max() > 1e-4                                          # the wrist image reaches the actions
    with pytest.raises(ValueError, match='wrist_image is missing'): check_inputs(img, ids, pro, cfg)
    with pytest.raises(ValueError, match=r'wrist_image must have shape \(B, 3, 32, 32\)'): check_inputs(img, ids, pro, cfg, torch.randn(2, 3, 48, 48))
    with pytest.raises(ValueError, match='no wrist camera'): check_inputs(img, ids, pro, ModelConfig(**SMALL, vocab_size=cfg.vocab_size), w1)
    with pytest.raises(ValueError, match='pass wrist_image'): net(img, ids, pro)
    assert sum(p.numel() for p in net.wrist.parameters()) > 0 and net.fuse[0].in_features == 4 * cfg.d_model


def test_policy_in_a_wrist_env_and_missing_wrist_error(policy):
    env = env_for(policy); o, _ = env.reset(seed=2); env.close()
    assert o['wrist_image'].shape == (W, W, 3)
    policy.reset(); a = policy.select_action(o)
    np.testing.assert_array_equal(a, policy.predict_action_chunk(o)[0])            # the first action of the chunk it read
    other = policy.predict_action_chunk({**o, 'wrist_image': np.zeros_like(o['wrist_image'])})[0]
    assert np.abs(other - a).max() > 1e-5                                          # ... and the wrist view is part of what it read
    with pytest.raises(ValueError, match=r"obs lacks \['wrist_image'\]"): policy.predict_action_chunk({k: v for k, v in o.items() if k != 'wrist_image'})
    stats = {k: v for k, v in bounds_stats().items() if k != WRIST_IMAGE}
    with pytest.raises(ValueError, match="no 'wrist_image' statistics"): VLAPolicy(policy.net, Normalizer(stats), policy.tokenizer)


def test_learner_trains_on_wrist_data_and_rejects_mismatch(wrist_data, tmp_path):
    tok = wrist_data.tokenizer; seed_everything(0)
    net = VLANet(ModelConfig(vocab_size=tok.vocab_size, max_tokens=tok.max_len, wrist_size=W, **SMALL))
    learner = VLAImitationLearner(net, wrist_data, ImitationConfig(batch_size=8, eval_every=0, eval_episodes=1, out_dir=str(tmp_path/'il'), val_frac=0.2))
    w0 = net.wrist.convs[0][0].weight.detach().clone()
    learner.train_imitation(1, max_steps=3)
    assert (net.wrist.convs[0][0].weight - w0).abs().max() > 0                   # the wrist encoder gets gradients
    _, m = vla_loss(net, learner.val_data.batch(np.arange(4))); assert np.isfinite(m['action_loss'])
    rep = dagger_rollouts(learner.policy(), tmp_path/'dag', 1, seed=5, env=env_for(learner.policy()))
    assert WRIST_IMAGE in EpisodeDataset(rep['root']).load_episode(0)                # on-policy frames keep the wrist view
    other = VLANet(ModelConfig(vocab_size=tok.vocab_size, max_tokens=tok.max_len, wrist_size=40, **SMALL))
    with pytest.raises(ValueError, match='40-pixel wrist camera but .* has 32-pixel wrist images'):
        VLAImitationLearner(other, wrist_data, ImitationConfig(out_dir=str(tmp_path/'x')))


def test_export_and_runtime_with_wrist(policy, tmp_path):
    net = policy.net
    assert input_names(policy.cfg) == ('image', 'token_ids', 'proprio', 'wrist_image')
    d = parity(net, dict(torchscript=export_torchscript(net), ort=ort_session(export_onnx(net, tmp_path/'w.onnx'))), B=3)
    assert all(v < 1e-4 for v in d.values()), d
    calib = calibration_observations(6, seed=0, wrist_size=W)
    assert all(o['wrist_image'].shape == (W, W, 3) for o in calib)
    art = export_artifact(policy, tmp_path/'art', DeployConfig(calib_frames=6), calib=calib)
    env = sim.TabletopEnv(image_size=48, wrist_camera=True, wrist_size=W); o, _ = env.reset(seed=4); env.close()
    for b in ('ort_fp32', 'torchscript'):
        rt = OptimizedVLAInference(art, b, warmup=1)
        np.testing.assert_allclose(rt.predict_action_chunk(o), policy.predict_action_chunk(o), atol=1e-4)
    with pytest.raises(ValueError, match=r"obs lacks \['wrist_image'\]"): rt.infer({k: v for k, v in o.items() if k != 'wrist_image'})


def test_sb3_extractor_reads_the_wrist_camera():
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env
    from vla_nb.model import VLAFeaturesExtractor
    venv = make_vec_env(make_token_env, n_envs=1, seed=0, env_kwargs=dict(image_size=48, max_steps=16, wrist_camera=True, wrist_size=W))
    ppo = PPO('MultiInputPolicy', venv, n_steps=16, batch_size=16, n_epochs=1, seed=0, device='cpu',
              policy_kwargs=dict(features_extractor_class=VLAFeaturesExtractor, features_extractor_kwargs=dict(config=ModelConfig(**SMALL))))
    ppo.learn(16)
    ext = ppo.policy.features_extractor
    assert ext.net.cfg.wrist_size == W and ext.net.wrist is not None
    from stable_baselines3.common.preprocessing import preprocess_obs
    obs = preprocess_obs(ppo.policy.obs_to_tensor(venv.reset())[0], ppo.observation_space)   # as SB3 feeds the extractor
    with torch.no_grad():
        f1 = ext(obs); f2 = ext({**obs, 'wrist_image': torch.rand_like(obs['wrist_image'])})
    assert (f1 - f2).abs().max() > 1e-5                                           # the wrist view reaches the features
    venv.close()
