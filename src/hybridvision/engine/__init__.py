"""hybridvision.engine"""
