; The Phi Gateway installer for Windows x64 (NSIS 3, 64-bit stub). Built by image/windows/build:
;
;   makensis -DVERSION=0.1.0 -DPAYLOAD=<dir> -DOUTFILE=<setup.exe> image/windows/phi-gateway.nsi
;
; PAYLOAD holds what goes to $PROGRAMFILES64\Phi Gateway: python\ (the CPython 3.11 embeddable runtime with
; the gateway and its dependencies installed in python\Lib\site-packages), phi_service.py, phi-gateway.cmd.
; Owns: the install (program files, the home C:\ProgramData\Phi Gateway limited to SYSTEM and
; Administrators, first-time init and certificate, the PhiGateway service, the tcp/8080 firewall rule),
; the upgrade (service stopped, program files replaced, home kept, service started: migrations run at
; start) and the uninstall (service and rule removed, program files removed, the home KEPT).
; Silent: setup.exe /S /SITE=<site id>   (/SITE is needed only when the home is not initialized yet)

!ifndef VERSION
  !error "define VERSION (makensis -DVERSION=...)"
!endif
!ifndef PAYLOAD
  !error "define PAYLOAD (makensis -DPAYLOAD=<dir>)"
!endif
!ifndef OUTFILE
  !define OUTFILE "phi-gateway-${VERSION}-setup.exe"
!endif

Unicode true
Target amd64-unicode
SetCompressor /SOLID lzma
RequestExecutionLevel admin
ManifestSupportedOS all

!include LogicLib.nsh
!include FileFunc.nsh
!include nsDialogs.nsh
!include x64.nsh

!define PRODUCT "Phi Gateway"
!define SERVICE "PhiGateway"
!define FIREWALL_RULE "Phi Gateway (tcp/8080)"
!define UNINSTALL_KEY "Software\Microsoft\Windows\CurrentVersion\Uninstall\PhiGateway"
!define PY '"$INSTDIR\python\python.exe"'
!define CLI `${PY} -c "import sys; sys.argv[0] = 'phi-gateway'; from appliance.cli import main; main()"`

Name "${PRODUCT} ${VERSION}"
OutFile "${OUTFILE}"
InstallDir "$PROGRAMFILES64\${PRODUCT}"
ShowInstDetails show
ShowUninstDetails show
VIProductVersion "${VERSION}.0"
VIAddVersionKey "ProductName" "${PRODUCT}"
VIAddVersionKey "ProductVersion" "${VERSION}"
VIAddVersionKey "FileDescription" "${PRODUCT} ${VERSION} setup"
VIAddVersionKey "FileVersion" "${VERSION}"
VIAddVersionKey "LegalCopyright" "${PRODUCT}"

Var Home
Var Site
Var SiteField

Page custom SitePage SitePageLeave
Page instfiles
UninstPage uninstConfirm
UninstPage instfiles

Function .onInit
  ${IfNot} ${RunningX64}
    MessageBox MB_ICONSTOP|MB_OK "${PRODUCT} needs 64-bit Windows (10 / Server 2016 or newer)." /SD IDOK
    Abort
  ${EndIf}
  SetRegView 64
  SetShellVarContext all
  StrCpy $Home "$APPDATA\${PRODUCT}"  ; C:\ProgramData\Phi Gateway
  ${GetParameters} $0
  ClearErrors
  ${GetOptions} $0 "/SITE=" $Site
  ${If} ${Silent}
  ${AndIf} $Site == ""
  ${AndIfNot} ${FileExists} "$Home\vault.db"
    SetErrorLevel 2
    Abort  ; a silent first install needs /SITE=<site id>
  ${EndIf}
FunctionEnd

Function SitePage
  ${If} ${FileExists} "$Home\vault.db"
    Abort  ; an upgrade: the home already names its site
  ${EndIf}
  nsDialogs::Create 1018
  Pop $0
  ${NSD_CreateLabel} 0 0 100% 36u "The site identifier of this gateway (letters, digits, dots, dashes). \
It is written once into $Home\gateway.toml and names the site in every audit record."
  Pop $0
  ${NSD_CreateText} 0 40u 100% 12u "$Site"
  Pop $SiteField
  nsDialogs::Show
FunctionEnd

Function SitePageLeave
  ${NSD_GetText} $SiteField $Site
  ${If} $Site == ""
    MessageBox MB_ICONEXCLAMATION|MB_OK "Enter the site identifier."
    Abort
  ${EndIf}
FunctionEnd

; Run a command, its output in the details; a non-zero exit aborts the install with MESSAGE.
!macro Run COMMAND MESSAGE
  DetailPrint `> ${COMMAND}`
  nsExec::ExecToLog `${COMMAND}`
  Pop $0
  ${If} $0 != 0
    MessageBox MB_ICONSTOP|MB_OK "${MESSAGE} (exit code $0); see the details above." /SD IDOK
    SetErrorLevel 3
    Abort
  ${EndIf}
!macroend

!macro StopService
  ; Waits for the drain (the service stops only after the gateway has exited).
  nsExec::ExecToLog `"$SYSDIR\WindowsPowerShell\v1.0\powershell.exe" -NoProfile -NonInteractive -Command \
"if (Get-Service ${SERVICE} -ErrorAction SilentlyContinue) { Stop-Service ${SERVICE} -Force }"`
  Pop $0
!macroend

Section "Phi Gateway" Main
  SectionIn RO
  SetRegView 64
  SetShellVarContext all

  ; 1. An upgrade stops the running gateway first; program files and runtime are replaced whole.
  !insertmacro StopService
  RMDir /r "$INSTDIR\python"
  SetOutPath "$INSTDIR"
  File /r "${PAYLOAD}\*"
  WriteUninstaller "$INSTDIR\uninstall.exe"

  ; 2. The home: only SYSTEM (S-1-5-18) and Administrators (S-1-5-32-544), inherited by what is created in it.
  CreateDirectory "$Home"
  !insertmacro Run `"$SYSDIR\icacls.exe" "$Home" /inheritance:r /grant:r *S-1-5-18:(OI)(CI)F *S-1-5-32-544:(OI)(CI)F` \
    "Cannot restrict the permissions of $Home"
  ${IfNot} ${FileExists} "$Home\vault.db"
    !insertmacro Run `${CLI} init --home "$Home" --site "$Site"` "phi-gateway init failed"
  ${EndIf}
  ${IfNot} ${FileExists} "$Home\tls\cert.pem"
    ReadEnvStr $1 COMPUTERNAME
    !insertmacro Run `${CLI} tls self-signed --home "$Home" --host "$1"` "phi-gateway tls self-signed failed"
  ${EndIf}

  ; 3. The service (started at boot, restarted after a failure), then started: migrations run at start.
  nsExec::ExecToLog `"$SYSDIR\sc.exe" query ${SERVICE}`
  Pop $0
  ${If} $0 == 0
    !insertmacro Run `${PY} "$INSTDIR\phi_service.py" --startup auto update` "Cannot update the service"
  ${Else}
    !insertmacro Run `${PY} "$INSTDIR\phi_service.py" --startup auto install` "Cannot register the service"
  ${EndIf}
  nsExec::ExecToLog `"$SYSDIR\sc.exe" failure ${SERVICE} reset= 86400 actions= restart/5000/restart/5000/restart/60000`
  Pop $0
  nsExec::ExecToLog `"$SYSDIR\sc.exe" failureflag ${SERVICE} 1`
  Pop $0

  ; 4. Windows Firewall: tcp/8080 inbound only.
  nsExec::ExecToLog `"$SYSDIR\netsh.exe" advfirewall firewall delete rule name="${FIREWALL_RULE}"`
  Pop $0
  !insertmacro Run `"$SYSDIR\netsh.exe" advfirewall firewall add rule name="${FIREWALL_RULE}" dir=in \
action=allow protocol=TCP localport=8080 profile=any` "Cannot open tcp/8080 in Windows Firewall"

  !insertmacro Run `"$SYSDIR\sc.exe" start ${SERVICE}` "The service did not start (see $Home\logs\gateway.log)"

  WriteRegStr HKLM "${UNINSTALL_KEY}" "DisplayName" "${PRODUCT}"
  WriteRegStr HKLM "${UNINSTALL_KEY}" "DisplayVersion" "${VERSION}"
  WriteRegStr HKLM "${UNINSTALL_KEY}" "Publisher" "${PRODUCT}"
  WriteRegStr HKLM "${UNINSTALL_KEY}" "InstallLocation" "$INSTDIR"
  WriteRegStr HKLM "${UNINSTALL_KEY}" "UninstallString" '"$INSTDIR\uninstall.exe"'
  WriteRegStr HKLM "${UNINSTALL_KEY}" "QuietUninstallString" '"$INSTDIR\uninstall.exe" /S'
  WriteRegDWORD HKLM "${UNINSTALL_KEY}" "NoModify" 1
  WriteRegDWORD HKLM "${UNINSTALL_KEY}" "NoRepair" 1
  DetailPrint "${PRODUCT} ${VERSION} serves HTTPS on tcp/8080; home: $Home; logs: $Home\logs"
  DetailPrint "It refuses every API request until a signed policy is imported (README: Policy)."
SectionEnd

Function un.onInit
  SetRegView 64
  SetShellVarContext all
  StrCpy $Home "$APPDATA\${PRODUCT}"
FunctionEnd

Section "Uninstall"
  SetRegView 64
  SetShellVarContext all
  !insertmacro StopService
  nsExec::ExecToLog `${PY} "$INSTDIR\phi_service.py" remove`
  Pop $0
  nsExec::ExecToLog `"$SYSDIR\netsh.exe" advfirewall firewall delete rule name="${FIREWALL_RULE}"`
  Pop $0
  RMDir /r "$INSTDIR\python"
  Delete "$INSTDIR\phi_service.py"
  Delete "$INSTDIR\phi-gateway.cmd"
  Delete "$INSTDIR\uninstall.exe"
  RMDir "$INSTDIR"
  DeleteRegKey HKLM "${UNINSTALL_KEY}"
  DetailPrint "The home $Home is KEPT (keys, vault, audit ledger, models): remove it yourself if it must go."
  MessageBox MB_ICONINFORMATION|MB_OK "${PRODUCT} is removed. Its home $Home is KEPT \
(master key, vault, audit ledger, models); remove it yourself if it must go." /SD IDOK
SectionEnd
