"""`vitrine images serve`: the image service (AMS) as its own process."""

from __future__ import annotations

import argparse

from vitrine.config import add_dataclass_args, from_args


def register(sub: argparse._SubParsersAction) -> None:
    from image_service.descriptor import DescriptorConfig
    from image_service.server import ServeConfig

    p = sub.add_parser("images", help="the image service (AMS): descriptor model on the server side")
    isub = p.add_subparsers(dest="images_command", required=True, metavar="SUBCOMMAND")
    s = isub.add_parser("serve", help="serve embed/backward over torch.distributed.rpc until stopped (SIGTERM)",
                        description="Serve a processed dataset's images: workers send image ids and get small "
                                    "embeddings, then send the embeddings' gradients; the descriptor head trains "
                                    "here. Listens on 127.0.0.1 unless --host says otherwise.")
    add_dataclass_args(s, ServeConfig)
    add_dataclass_args(s.add_argument_group("descriptor"), DescriptorConfig)
    s.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from image_service.descriptor import DescriptorConfig
    from image_service.server import ServeConfig, serve

    return serve(from_args(ServeConfig, args), from_args(DescriptorConfig, args),
                 log=lambda msg: print(msg, flush=True))
