"""``python -m napari_wsdino.cli`` runs the ``wsdino`` command."""

import sys

from napari_wsdino.cli import main

sys.exit(main())
