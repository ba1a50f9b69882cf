"""Named tolerances, limits and defaults of the library."""

import os

#: Run slow invariant checks (set in tests).
STRICT = os.environ.get("RECON3D_STRICT", "") not in ("", "0")

#: Largest accepted single file in a bundle, bytes.
MAX_FILE_BYTES = 64 * 1024 * 1024
#: Largest accepted image, pixels (width * height).
MAX_IMAGE_PIXELS = 4096 * 4096
#: Largest accepted total uncompressed size of a ZIP bundle, bytes.
MAX_ARCHIVE_UNCOMPRESSED_BYTES = 1024 * 1024 * 1024
#: Largest accepted compression ratio of one ZIP entry (zip bombs exceed it).
MAX_ZIP_RATIO = 200.0
#: Largest accepted number of entries in a ZIP bundle.
MAX_ZIP_ENTRIES = 2048
#: Largest total of decoded pixels of one bundle (photos and depth renders together; the sneaker
#: has 31.5 M: six 2048^2 photos and six 1024^2 depth renders). Bounds the memory of a decode.
MAX_TOTAL_PIXELS = 96 * 1024 * 1024
#: Largest accepted number of views.
MAX_VIEWS = 256
#: Smallest number of foreground depth pixels for a view to count as non-empty.
MIN_FOREGROUND_PIXELS = 16
