//go:build tools

// Package tools records the upstream commands this wrapper module builds, so
// that `go mod tidy` keeps their dependencies in go.mod/go.sum. It is never
// compiled; build.sh runs `go build k8s.io/kubernetes/cmd/<name>`.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
