#!/usr/bin/python3
"""The OCI image's HEALTHCHECK: GET /health on the public port; exit 0 on 200, 1 otherwise.

  phi-healthcheck [/health]  (PHI_HOME, PHI_HEALTH_PORT: the port inside the container, default 8080)

Owns: nothing but the probe. HTTPS when the home holds a certificate, to 127.0.0.1 without verifying it
(loopback inside the container: there is nobody in between to authenticate); plain HTTP otherwise.
Standard library only, with the system Python: the image has no curl.
"""

import http.client
import os
import ssl
import sys

home = os.environ.get("PHI_HOME", "/var/lib/phi-gateway")
port = int(os.environ.get("PHI_HEALTH_PORT", "8080"))
if os.path.exists(os.path.join(home, "tls", "cert.pem")):
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # loopback only; see above
    conn: http.client.HTTPConnection = http.client.HTTPSConnection(
        "127.0.0.1", port, timeout=4, context=context
    )
else:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=4)
try:
    conn.request("GET", sys.argv[1] if len(sys.argv) > 1 else "/health")
    response = conn.getresponse()
    body = response.read(200).decode("utf-8", "replace").strip()
except OSError as exc:
    print(f"unhealthy: {exc}")
    sys.exit(1)
print(f"{response.status} {body}")
sys.exit(0 if response.status == 200 else 1)
