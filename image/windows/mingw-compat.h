/* Forced into every C file of the mingw-w64 build (mingw-w64-x86_64.cmake): what Debian 12's mingw-w64
 * headers (v10) lack and ggml-cpu.c uses on Windows 8+ (SetThreadInformation with ThreadPowerThrottling).
 * Layout from the Windows SDK's processthreadsapi.h. */
#ifndef THREAD_POWER_THROTTLING_CURRENT_VERSION
#define THREAD_POWER_THROTTLING_CURRENT_VERSION 1
#define THREAD_POWER_THROTTLING_EXECUTION_SPEED 0x1
#define THREAD_POWER_THROTTLING_VALID_FLAGS THREAD_POWER_THROTTLING_EXECUTION_SPEED
typedef struct _THREAD_POWER_THROTTLING_STATE {
    unsigned long Version;
    unsigned long ControlMask;
    unsigned long StateMask;
} THREAD_POWER_THROTTLING_STATE;
#endif
