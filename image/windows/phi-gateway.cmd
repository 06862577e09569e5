@echo off
rem phi-gateway: the gateway's command line (phi-gateway --help), run by the bundled CPython 3.11.
rem Installed by image/windows/phi-gateway.nsi; run it from an elevated prompt (the home is Administrators' only).
"%~dp0python\python.exe" -c "import sys; sys.argv[0] = 'phi-gateway'; from appliance.cli import main; main()" %*
