"Fixtures shared by several test files."
import pytest

from vla_nb.data import DataConfig, EpisodeDataset, SyntheticDataGenerator


@pytest.fixture(scope='session')
def tiny_data(tmp_path_factory):
    "Six expert episodes at 48 px, recorded once per test session (read-only: copy it before changing it)."
    root = tmp_path_factory.mktemp('tiny') / 'data'
    cfg = DataConfig(root=str(root), num_episodes=6, image_size=48, seed=7)
    SyntheticDataGenerator(cfg).generate_dataset(progress_bar=False)
    return EpisodeDataset(root)
