"""The artifact validator behind ``image/check``: one module per artifact, one ``Report`` they all write to.

Modules: ``report`` (the output lines and the failure count), ``ustar`` (raw tar headers, for the OVA's
format and order), ``ova`` (the package: order, manifest, hashes), ``ovf`` (the descriptor's
cross-references and virtual hardware), ``vmdk`` (the disk's own header and ``qemu-img``), ``oci`` (docker
archive and OCI layout: digests and the image config), ``layers`` (what the filesystem layers hold after
whiteouts: compilers, secrets, caches), ``windows`` (the NSIS installer: PE header and ``7z`` listing),
``cli`` (arguments and discovery under dist/). Never modifies an artifact; never reaches the network.
"""
