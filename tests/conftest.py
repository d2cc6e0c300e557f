import pytest
import torch

from tests.helpers import write_split_images


def pytest_collection_modifyitems(config, items):
    """A test marked `cuda` is skipped where there is no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)


@pytest.fixture
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """train/ and val/ of 24 and 8 random 20x20 RGB images in two classes (`a`, `b`); a module's
    own copy, so that a test that adds a file changes no other module's data."""
    return write_split_images(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared CPU the threads' spinning
    makes them several times slower (`pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
