"""`make demo`: the default preset classifies real photographs and draws its routing.

Writes CC0 / public-domain photographs from scikit-image's data module
(Chelsea the cat and a coffee cup, CC0 by their photographers; NASA's
astronaut Eileen Collins and SpaceX's DSCOVR launch, public domain) to
`OUTPUT/photos/`, then runs the installed `keras-vmoe` command on them:

    keras-vmoe classify --routing-map OUTPUT/routing_map.png OUTPUT/photos/*.jpg
"""

import argparse
import os
import pathlib
import subprocess
import sys

PHOTOS = ("chelsea", "rocket", "coffee", "astronaut")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=pathlib.Path, default=pathlib.Path("demo_output"))
    parser.add_argument("--preset", default=None, help="default: the command's default preset")
    args = parser.parse_args()

    import skimage.data
    from PIL import Image

    photos = args.output / "photos"
    photos.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in PHOTOS:
        path = photos / f"{name}.jpg"
        Image.fromarray(getattr(skimage.data, name)()).convert("RGB").save(path, quality=95)
        paths.append(str(path))
    command = pathlib.Path(sys.executable).parent / "keras-vmoe"
    routing_map = args.output / "routing_map.png"
    argv = [str(command), "classify", "--routing-map", str(routing_map), *paths]
    if args.preset:
        argv[2:2] = ["--preset", args.preset]
    environment = dict(os.environ)
    environment.setdefault("KERAS_BACKEND", "jax")
    environment.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    print("$ keras-vmoe", " ".join(argv[1:]), flush=True)
    status = subprocess.call(argv, env=environment)
    if status == 0 and not routing_map.is_file():
        print(f"demo: {routing_map} was not written", file=sys.stderr)
        return 1
    return status


if __name__ == "__main__":
    sys.exit(main())
