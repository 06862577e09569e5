# CMake toolchain: Windows x64 from Debian's mingw-w64 (posix threads variant, which has std::thread).
# Used by image/windows/build-llama. Portable code only: the CPU-specific code is in ggml's backend variants.
set(CMAKE_SYSTEM_NAME Windows)
set(CMAKE_SYSTEM_PROCESSOR AMD64)
set(CMAKE_C_COMPILER x86_64-w64-mingw32-gcc-posix)
set(CMAKE_CXX_COMPILER x86_64-w64-mingw32-g++-posix)
set(CMAKE_RC_COMPILER x86_64-w64-mingw32-windres)
set(CMAKE_FIND_ROOT_PATH /usr/x86_64-w64-mingw32)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
# GCC on Win64 does not align the stack beyond 16 bytes, so a spilled AVX/AVX-512 register written with an
# aligned move can fault (GCC bug 54412); the assembler rewrites aligned vector moves as unaligned ones.
# mingw-compat.h: what Debian 12's mingw-w64 headers lack (see the file).
set(CMAKE_C_FLAGS_INIT "-Wa,-muse-unaligned-vector-move -include ${CMAKE_CURRENT_LIST_DIR}/mingw-compat.h")
set(CMAKE_CXX_FLAGS_INIT "-Wa,-muse-unaligned-vector-move")
# No MinGW runtime DLLs beside ours: libgcc, libstdc++ and winpthread are linked in statically.
# --exclude-libs: a DLL that exports all its symbols must not re-export those of the static runtime (not
# ALL: CMake links a DLL's own objects from an objects.a archive)
# (else ggml.dll sees _Unwind_Resume twice: from libgcc_eh and from ggml-base.dll).
set(CMAKE_SHARED_LINKER_FLAGS_INIT "-static -static-libgcc -static-libstdc++ -Wl,--exclude-libs,libgcc.a:libgcc_eh.a:libstdc++.a:libwinpthread.a:libpthread.a")
# The CPU variants are MODULE libraries (GGML_BACKEND_DL): same flags.
set(CMAKE_MODULE_LINKER_FLAGS_INIT "${CMAKE_SHARED_LINKER_FLAGS_INIT}")
set(CMAKE_EXE_LINKER_FLAGS_INIT "-static -static-libgcc -static-libstdc++")
