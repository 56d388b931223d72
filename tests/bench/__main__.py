import sys

if sys.argv[1:2] == ["sidecar"]:
    from .sidecar import main as sidecar_main

    sys.exit(sidecar_main(sys.argv[2:]))

if sys.argv[1:2] == ["revocation"]:
    from .revocation import main as revocation_main

    sys.exit(revocation_main(sys.argv[2:]))

from .run import main

sys.exit(main())
