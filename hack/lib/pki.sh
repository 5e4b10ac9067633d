# shellcheck shell=bash
# Certificates, keys and kubeconfigs for the throwaway control plane, made
# with openssl. Everything lands under one directory that `down` removes.
# Sourced by hack/cluster.sh after lib/common.sh; only defines functions.

# The first address of --service-cluster-ip-range (10.96.0.0/16 in
# cluster.sh): the `kubernetes` Service, a SAN of the serving certificate.
readonly WGMESH_KUBERNETES_SERVICE_IP=10.96.0.1
readonly WGMESH_CERT_DAYS=365

# gen_key writes an ECDSA P-256 private key (PKCS#8) readable only by its
# owner. P-256 rather than RSA: five RSA keys cost seconds on every `up`, and
# Kubernetes takes ECDSA everywhere here (TLS, client certs, ES256 tokens).
gen_key() {
	(umask 077 && openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 \
		-out "$1" 2>/dev/null) || die "openssl could not create key $1"
}

# sign_cert NAME SUBJECT EXTENSIONS: key NAME.key, certificate NAME.crt
# signed by ca.crt in the current directory.
sign_cert() {
	local name=$1 subject=$2 extensions=$3
	gen_key "${name}.key"
	openssl req -new -key "${name}.key" -subj "${subject}" -out "${name}.csr" 2>/dev/null ||
		die "openssl could not create ${name}.csr"
	openssl x509 -req -in "${name}.csr" -CA ca.crt -CAkey ca.key -CAcreateserial \
		-days "${WGMESH_CERT_DAYS}" -sha256 -extfile <(printf '%s\n' "${extensions}") \
		-out "${name}.crt" 2>/dev/null || die "openssl could not sign ${name}.crt"
	rm -f "${name}.csr"
}

# make_pki DIR ADDRESS creates, in DIR:
#   ca.{key,crt}          the cluster CA (client CA, serving CA, CSR signer)
#   apiserver.{key,crt}   serving cert for 127.0.0.1, localhost, ADDRESS,
#                         kubernetes.default.svc and the Service IP
#   admin.{key,crt}       client cert for a user in system:masters
#   controller-manager.{key,crt}  client cert for system:kube-controller-manager
#   apiserver-kubelet-client.{key,crt}  the API server's client cert for
#                         kubelets (system:masters)
#   sa.{key,pub}          service-account token signing key pair
make_pki() {
	local dir=$1 address=$2 sans
	mkdir -p "${dir}"
	(
		cd "${dir}" || exit 1
		gen_key ca.key
		openssl req -x509 -new -key ca.key -subj "/CN=wgmesh-cluster-ca" \
			-days "${WGMESH_CERT_DAYS}" -sha256 -out ca.crt \
			-addext "basicConstraints=critical,CA:TRUE" \
			-addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" 2>/dev/null ||
			die "openssl could not create the CA"

		sans="IP:127.0.0.1,DNS:localhost,IP:${WGMESH_KUBERNETES_SERVICE_IP}"
		sans+=",DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc"
		sans+=",DNS:kubernetes.default.svc.cluster.local"
		[[ ${address} == 127.0.0.1 ]] || sans+=",IP:${address}"
		sign_cert apiserver "/CN=kube-apiserver" \
			"keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=${sans}"

		local client="keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth"
		sign_cert admin "/O=system:masters/CN=wgmesh-admin" "${client}"
		# The default RBAC bindings grant this user what the controllers need.
		sign_cert controller-manager "/CN=system:kube-controller-manager" "${client}"
		# The API server's identity towards kubelets (logs, exec, port-forward);
		# unused while there are no nodes.
		sign_cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" "${client}"

		gen_key sa.key
		openssl pkey -in sa.key -pubout -out sa.pub 2>/dev/null ||
			die "openssl could not derive sa.pub"
	)
}

# write_kubeconfig FILE SERVER CA CERT KEY writes a kubeconfig with the
# credentials embedded, so it keeps working if it is copied elsewhere.
write_kubeconfig() {
	local file=$1 server=$2 ca=$3 cert=$4 key=$5
	(
		umask 077
		cat >"${file}" <<KUBECONFIG
apiVersion: v1
kind: Config
clusters:
- name: wgmesh
  cluster:
    server: ${server}
    certificate-authority-data: $(base64 -w0 <"${ca}")
users:
- name: wgmesh
  user:
    client-certificate-data: $(base64 -w0 <"${cert}")
    client-key-data: $(base64 -w0 <"${key}")
contexts:
- name: wgmesh
  context:
    cluster: wgmesh
    user: wgmesh
current-context: wgmesh
KUBECONFIG
	)
}
