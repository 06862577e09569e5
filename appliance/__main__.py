"""``python -m appliance`` is ``phi-gateway``."""

from appliance.cli import main

main()
